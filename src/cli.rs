//! Command-line definitions.

use clap::{Args, Parser, Subcommand, ValueEnum};
use std::path::PathBuf;

/// sbdnet: train and run binarized, sparse-binarized and diagonal-sparse neural networks.
///
/// Start with `sbdnet demo` (dscnn in float, with binary weights and with sparse binary
/// weights on the built-in 8x8 digits, about 30 s), then `sbdnet data fetch mnist` and
/// `sbdnet train --dataset mnist --precision sw1 --epochs 15 --out runs/mnist-sw1`;
/// `sbdnet summary runs/mnist-sw1` shows what binarization and group sparsity save.
#[derive(Parser, Debug)]
#[command(name = "sbdnet", version, about, long_about)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

impl Cli {
    /// The `--threads` of whichever command was given.
    pub fn threads(&self) -> Option<usize> {
        match &self.command {
            Command::Train(a) => a.threads,
            Command::Eval(a) => a.threads,
            Command::Bench(BenchCommand::Train(a)) => Some(a.threads),
            Command::Bench(BenchCommand::Linear(a)) => Some(a.threads),
            Command::Bench(BenchCommand::Model(a)) => Some(a.threads),
            Command::Data(_) | Command::Summary(_) => Some(1),
            Command::Demo(a) => a.threads,
            Command::Plot(_) => Some(1),
            Command::Export(a) => a.threads,
            Command::Infer(a) => Some(a.threads),
        }
    }
}

/// Subcommands.
#[derive(Subcommand, Debug)]
pub enum Command {
    /// Train a model; writes a checkpoint and metrics.jsonl into --out after every epoch.
    Train(TrainArgs),
    /// Evaluate a checkpoint directory on a data set's test split.
    Eval(EvalArgs),
    /// Time parts of sbdnet.
    #[command(subcommand)]
    Bench(BenchCommand),
    /// Install and inspect data sets.
    #[command(subcommand)]
    Data(DataCommand),
    /// Draw figures (PNG) from training runs: learning curves, accuracy against a knob.
    Plot(crate::plot::PlotArgs),
    /// Train dscnn at float, w1 (binary weights) and sw1 (binary weights, 70% of the weight
    /// groups pruned) on the built-in digits and compare.
    Demo(DemoArgs),
    /// Per-layer parameters, bits, memory, MACs, multiplications and additions of a model in
    /// its deployed form (of a checkpoint DIR, or of --model/--precision).
    Summary(SummaryArgs),
    /// Export a trained checkpoint as a deployed model: `.sbd` (packed sign bits, folded
    /// BatchNorm and thresholds, for `sbdnet infer` / `bench model`) or float ONNX.
    Export(ExportArgs),
    /// Run a deployed `.sbd` model over a data set's test split (accuracy; agreement with the
    /// training-time model with --agree-with).
    Infer(InferArgs),
}

/// Export format.
#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExportFormat {
    /// sbdnet's deployment file (safetensors container, format version in the metadata).
    Sbd,
    /// ONNX (opset 13) of the float version of the same architecture, for ONNX Runtime.
    Onnx,
}

/// `sbdnet export`.
#[derive(Args, Debug, Clone)]
pub struct ExportArgs {
    /// Checkpoint directory written by `sbdnet train`. Without it, the model options below
    /// describe an untrained model (initial weights) to export for timing the runtime.
    pub dir: Option<PathBuf>,
    #[command(flatten)]
    #[allow(missing_docs)]
    pub m: ModelArgs,
    /// Input of an untrained model as HxWxC (default: 32x32x1 for mobilenet and
    /// resnet20-ds, else 28x28x1).
    #[arg(long)]
    pub input: Option<String>,
    /// Output file.
    #[arg(short, long)]
    pub out: PathBuf,
    /// File format.
    #[arg(long, value_enum, default_value_t = ExportFormat::Sbd)]
    pub format: ExportFormat,
    /// Re-estimate batch-norm statistics over this many training batches of 256 first (as
    /// `sbdnet eval --bn-recalibrate`); 0 exports the statistics as saved.
    #[arg(long, default_value_t = 0)]
    pub bn_recalibrate: usize,
    /// Data set for --bn-recalibrate (default: the one the model was trained on).
    #[arg(long)]
    pub dataset: Option<String>,
    #[command(flatten)]
    #[allow(missing_docs)]
    pub data: DataOpts,
    /// Worker threads.
    #[arg(long)]
    pub threads: Option<usize>,
    /// Print one JSON object.
    #[arg(long)]
    pub json: bool,
}

/// `sbdnet infer`.
#[derive(Args, Debug, Clone)]
pub struct InferArgs {
    /// A `.sbd` file written by `sbdnet export`.
    pub model: PathBuf,
    /// Data set whose test split to run (mnist, fashion-mnist, digits, cifar10).
    #[arg(long)]
    pub dataset: String,
    /// Also run the training-time model of this checkpoint directory and report the share of
    /// test images on which both predict the same class.
    #[arg(long, value_name = "DIR")]
    pub agree_with: Option<PathBuf>,
    /// Use the plain float reference executor instead of the planned, bit-packed one.
    #[arg(long)]
    pub reference: bool,
    /// Binary layers on float inputs (w1 models): 8-bit add/subtract (int8) or float.
    #[arg(long, value_enum, default_value_t = A8Arg::Int8)]
    pub a8: A8Arg,
    /// Only the first N test images.
    #[arg(long, value_parser = positive)]
    pub limit: Option<usize>,
    /// Images per run of the planned executor. 1 is the fastest here: each image's
    /// activations stay in cache (10,000 test images: 1.5 s at 1, 2.5 s at 64 for a dscnn
    /// sw1 export; 1.4 s against 3.4 s for the shortcut w1a1 one).
    #[arg(long, default_value_t = 1, value_parser = positive)]
    pub batch: usize,
    #[command(flatten)]
    #[allow(missing_docs)]
    pub data: DataOpts,
    /// Worker threads.
    #[arg(long, default_value_t = 1)]
    pub threads: usize,
    /// Print one JSON object (`accuracy`, `images`, `agreement` with --agree-with).
    #[arg(long)]
    pub json: bool,
}

/// `sbdnet demo`.
#[derive(Args, Debug, Clone)]
pub struct DemoArgs {
    /// Epochs per model.
    #[arg(long, default_value_t = 30)]
    pub epochs: usize,
    /// Worker threads (default: all cores).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Where the checkpoints go.
    #[arg(long, default_value = "runs/demo")]
    pub out: PathBuf,
    /// Print one JSON object.
    #[arg(long)]
    pub json: bool,
}

impl TrainArgs {
    /// The defaults of `sbdnet train --model M --dataset D`.
    pub fn default_for(model: &str, dataset: &str) -> TrainArgs {
        let cli = Cli::parse_from(["sbdnet", "train"]);
        let Command::Train(mut a) = cli.command else { unreachable!("parsed a train command") };
        a.m.model = model.to_string();
        a.dataset = dataset.to_string();
        a
    }
}

/// `sbdnet summary`.
#[derive(Args, Debug, Clone)]
pub struct SummaryArgs {
    /// A checkpoint directory, or a deployed `.sbd` file (then the table comes from the
    /// runtime's plan: kernel per layer, stored bytes, XNOR+popcount operations, additions and
    /// multiplications as executed). Otherwise the model options below describe the model.
    pub dir: Option<PathBuf>,
    #[command(flatten)]
    #[allow(missing_docs)]
    pub m: ModelArgs,
    /// Input as HxWxC (default: 32x32x1 for mobilenet and resnet20-ds, else 28x28x1).
    #[arg(long)]
    pub input: Option<String>,
    /// Number of classes.
    #[arg(long, default_value_t = 10)]
    pub classes: usize,
    /// Print one JSON object (`layers`, `total`, `compression`).
    #[arg(long)]
    pub json: bool,
    /// Estimate energy per inference of the model at float, w1 (BD-Net) and w1a1 (and
    /// the checkpoint's own precision), from the per-operation and per-access table in
    /// docs/ENERGY.md.
    #[arg(long)]
    pub energy: bool,
}

/// Optimizers.
#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OptArg {
    /// SGD with Nesterov momentum 0.9.
    Sgd,
    /// Adam (L2 weight decay).
    Adam,
    /// AdamW (decoupled weight decay).
    Adamw,
}

/// Learning-rate schedules (after the linear warm-up).
#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SchedArg {
    /// Cosine decay to zero.
    Cosine,
    /// x0.1 every third of the run.
    Step,
    /// Constant.
    Constant,
}

/// Data augmentation.
#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AugArg {
    /// The data set's default: shifts for digits and MNIST, shifts + flips for Fashion-MNIST and CIFAR-10.
    Auto,
    /// None.
    None,
    /// Random shift (pad and crop).
    Shift,
    /// Random shift and horizontal flip.
    ShiftFlip,
}

/// Shared data options.
#[derive(Args, Debug, Clone)]
pub struct DataOpts {
    /// Where data sets are installed (default: $SBDNET_DATA, else the platform cache dir).
    #[arg(long, env = "SBDNET_DATA", value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
}

/// Model architecture and precision options shared by train, bench and summary.
#[derive(Args, Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct ModelArgs {
    /// Model: dscnn (depthwise-separable CNN), cnn (ordinary 3x3 convolutions, the float
    /// baseline), bdnet (dscnn with binary weights), mobilenet (MobileNet-V1 widths, 32x32),
    /// resnet20-ds (ResNet-20 with depthwise-separable blocks, 32x32), mlp (784-256-256-10 on
    /// flattened images), mlp-wide (784-1024-1024-10), vit-tiny (vision transformer: 7x7
    /// patches on 28x28, width 192, 6 blocks of 3 heads, MLP ratio 4, mean pooling; float),
    /// mixer-tiny (MLP-Mixer: the same patches and width, 6 blocks of token mixing (hidden
    /// 4 x tokens) and channel mixing (hidden 4 x 192); float).
    #[arg(long, default_value = "dscnn")]
    pub model: String,
    /// Precision of every convolution but the first: float, w1 (binary weights: additions and
    /// subtractions only), w1a1 (binary weights and activations: XNOR + popcount), sw1 / sw1a1
    /// (w1 / w1a1 with whole groups of weights pruned to zero: Sparse BD-Net).
    #[arg(long, default_value = "float")]
    pub precision: String,
    /// sw1/sw1a1: input channels per weight group of a pointwise (or ordinary) convolution; a
    /// depthwise group is one whole kernel.
    #[arg(long, default_value_t = sbdnet_nn::quant::DEFAULT_GROUP_SIZE)]
    #[serde(default = "default_group_size")]
    pub group_size: usize,
    /// Channel multiplier (0.5, 1, 2, ...).
    #[arg(long, default_value_t = 1.0)]
    pub width: f32,
    /// Binary-weight scale alpha = mean|W| per layer or per output channel.
    #[arg(long, value_enum, default_value_t = AlphaArg::Layer)]
    pub alpha: AlphaArg,
    /// Straight-through estimator: zero the weight gradient where |W| > this (0: no clipping).
    #[arg(long, default_value_t = 1.0)]
    pub ste_clip: f32,
    /// Scale binary weights' gradients by 1/alpha.
    #[arg(long)]
    pub grad_scale: bool,
    /// Binarize the first convolution and the classifier too (float by default).
    #[arg(long)]
    pub binarize_first_last: bool,
    /// w1a1: keep depthwise convolutions' inputs float (weights stay binary).
    #[arg(long)]
    #[serde(default)]
    pub float_dw_input: bool,
    /// w1a1: real-valued shortcut (identity, or 2x2 average pool at stride 2) around each
    /// binary convolution whose input and output channels agree, as in Bi-Real Net.
    #[arg(long)]
    #[serde(default)]
    pub shortcut: bool,
    /// Hidden linear layers (the classifier stays dense): dense, diag (DynaDiag: cyclic
    /// diagonals chosen by learned importance), set (masked dense, magnitude prune + random
    /// regrow) or rigl (masked dense, magnitude prune + gradient regrow). All sparse kinds keep
    /// the same number of weights at a given --sparsity.
    #[arg(long, value_enum, default_value_t = LinearArg::Dense)]
    #[serde(default)]
    pub linear: LinearArg,
    /// Fraction of zero weights in the sparse hidden linear layers.
    #[arg(long, default_value_t = 0.9)]
    #[serde(default = "default_sparsity")]
    pub sparsity: f64,
    /// Steps between sparse-pattern updates (dT): DynaDiag candidate refresh, SET/RigL prune
    /// and regrow.
    #[arg(long, default_value_t = 100)]
    #[serde(default = "default_update_every")]
    pub update_every: usize,
    /// Initial fraction of weights (SET/RigL) or non-protected candidates (diag) replaced per
    /// update; cosine-decayed.
    #[arg(long, default_value_t = 0.3)]
    #[serde(default = "default_drop_fraction")]
    pub drop_fraction: f32,
    /// SET/RigL: fraction of training after which the masks stay fixed.
    #[arg(long, default_value_t = 0.75)]
    #[serde(default = "default_dst_stop")]
    pub dst_stop: f32,
    /// diag: candidate set size as a multiple of the K diagonals kept (the soft phase only
    /// ever computes this many).
    #[arg(long, default_value_t = 2.0)]
    #[serde(default = "default_candidates")]
    pub candidates: f32,
    /// diag: fraction of training over which the temperature anneals 5.0 -> 0.05; at its end
    /// the top-K diagonals by importance are kept and frozen.
    #[arg(long, default_value_t = 0.3)]
    #[serde(default = "default_freeze")]
    pub freeze: f32,
    /// diag: temperature of the importance softmax at the start of the soft phase.
    #[arg(long, default_value_t = 5.0)]
    #[serde(default = "default_t_start")]
    pub t_start: f32,
    /// diag: temperature at the end of the soft phase (cosine schedule between the two).
    #[arg(long, default_value_t = 0.05)]
    #[serde(default = "default_t_end")]
    pub t_end: f32,
    /// diag: multiplier of the importance scores' gradient (with SGD, their learning rate is
    /// this times the weights').
    #[arg(long, default_value_t = 1.0)]
    #[serde(default = "default_alpha_lr")]
    pub alpha_lr: f32,
}

fn default_group_size() -> usize {
    sbdnet_nn::quant::DEFAULT_GROUP_SIZE
}
fn default_sparsity() -> f64 {
    0.9
}
fn default_update_every() -> usize {
    100
}
fn default_drop_fraction() -> f32 {
    0.3
}
fn default_dst_stop() -> f32 {
    0.75
}
fn default_candidates() -> f32 {
    2.0
}
fn default_freeze() -> f32 {
    0.3
}
fn default_t_start() -> f32 {
    5.0
}
fn default_t_end() -> f32 {
    0.05
}
fn default_alpha_lr() -> f32 {
    1.0
}

/// Kind of the hidden linear layers.
#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LinearArg {
    /// Dense.
    #[default]
    Dense,
    /// DynaDiag diagonal-sparse.
    Diag,
    /// SET (masked dense, random regrow).
    Set,
    /// RigL (masked dense, gradient regrow).
    Rigl,
}

impl LinearArg {
    /// Lower-case name.
    pub fn name(self) -> &'static str {
        match self {
            LinearArg::Dense => "dense",
            LinearArg::Diag => "diag",
            LinearArg::Set => "set",
            LinearArg::Rigl => "rigl",
        }
    }
}

impl ModelArgs {
    /// The quantization these options describe.
    pub fn quant(&self) -> anyhow::Result<sbdnet_nn::QuantConfig> {
        let precision: sbdnet_nn::Precision = self.precision.parse().map_err(anyhow::Error::msg)?;
        anyhow::ensure!(self.ste_clip >= 0.0, "--ste-clip must be >= 0 (0 turns clipping off)");
        anyhow::ensure!(self.group_size >= 1, "--group-size must be at least 1");
        Ok(sbdnet_nn::QuantConfig {
            precision,
            alpha_per_channel: self.alpha == AlphaArg::Channel,
            ste_clip: (self.ste_clip > 0.0).then_some(self.ste_clip),
            grad_scale: self.grad_scale,
            binarize_first_last: self.binarize_first_last,
            float_depthwise_input: self.float_dw_input,
            real_shortcut: self.shortcut,
            group_size: self.group_size,
        })
    }

    /// The sparse-layer spec these options describe (`None`: dense).
    pub fn sparse(&self) -> anyhow::Result<Option<sbdnet_nn::SparseSpec>> {
        use sbdnet_nn::SparseKind;
        let kind = match self.linear {
            LinearArg::Dense => return Ok(None),
            LinearArg::Diag => SparseKind::Diag,
            LinearArg::Set => SparseKind::Set,
            LinearArg::Rigl => SparseKind::Rigl,
        };
        let spec = sbdnet_nn::SparseSpec {
            update_every: self.update_every,
            drop_fraction: self.drop_fraction,
            stop: self.dst_stop,
            candidates: self.candidates,
            freeze: self.freeze,
            t_start: self.t_start,
            t_end: self.t_end,
            alpha_lr: self.alpha_lr,
            ..sbdnet_nn::SparseSpec::new(kind, self.sparsity)
        };
        spec.validate().map_err(|e| anyhow::anyhow!("--linear {}: {e}", self.linear.name()))?;
        Ok(Some(spec))
    }

    /// The model configuration for inputs `[h, w, c]` and `classes`.
    pub fn config(&self, input: [usize; 3], classes: usize) -> anyhow::Result<sbdnet_nn::ModelConfig> {
        let cfg = sbdnet_nn::ModelConfig::build(&self.model, input, classes, self.width, self.quant()?)?;
        let spec = self.sparse()?;
        let cfg = cfg.with_hidden_linear(spec);
        anyhow::ensure!(
            spec.is_none() || cfg.has_sparse(),
            "--linear {}: model {} has no hidden linear layers (try --model mlp)",
            self.linear.name(),
            self.model
        );
        Ok(cfg)
    }
}

/// Scope of the binary-weight scale.
#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AlphaArg {
    /// One alpha per layer.
    Layer,
    /// One alpha per output channel.
    Channel,
}

/// `sbdnet train`.
#[derive(Args, Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct TrainArgs {
    #[command(flatten)]
    #[allow(missing_docs)]
    pub m: ModelArgs,
    /// Data set: digits (built in), mnist, fashion-mnist, cifar10.
    #[arg(long, default_value = "digits")]
    pub dataset: String,
    /// Epochs (default: 30 for digits, 15 otherwise).
    #[arg(long)]
    pub epochs: Option<usize>,
    /// Images per step.
    #[arg(long, default_value_t = 128)]
    pub batch_size: usize,
    /// Peak learning rate (default: 0.1 for SGD, 2e-3 for Adam/AdamW).
    #[arg(long)]
    pub lr: Option<f32>,
    /// Optimizer.
    #[arg(long, value_enum, default_value_t = OptArg::Sgd)]
    pub optimizer: OptArg,
    /// Learning-rate schedule.
    #[arg(long, value_enum, default_value_t = SchedArg::Cosine)]
    pub schedule: SchedArg,
    /// Linear warm-up, in epochs (fractions allowed).
    #[arg(long, default_value_t = 1.0)]
    pub warmup_epochs: f32,
    /// Weight decay on convolution and linear weights.
    #[arg(long, default_value_t = 5e-4)]
    pub weight_decay: f32,
    /// Label smoothing of the cross-entropy.
    #[arg(long, default_value_t = 0.0)]
    pub label_smoothing: f32,
    /// Before each evaluation, re-estimate batch-norm statistics over this many training
    /// batches (default: 100 with binary weights, whose running statistics otherwise lag the
    /// flipping signs; 0 for float).
    #[arg(long)]
    #[serde(default)]
    pub bn_recalibrate: Option<usize>,
    /// Data augmentation.
    #[arg(long, value_enum, default_value_t = AugArg::Auto)]
    pub augment: AugArg,
    #[command(flatten)]
    #[serde(default)]
    #[allow(missing_docs)]
    pub sparse: SparseTrainArgs,
    /// Seed for initialization, shuffling, augmentation and dropout.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Worker threads (default: all cores). Same seed and threads give bit-identical weights.
    #[arg(long)]
    pub threads: Option<usize>,
    /// Directory for checkpoint and metrics.jsonl (default: runs/<model>-<dataset>).
    #[arg(long, value_name = "DIR")]
    pub out: Option<PathBuf>,
    /// Initialize the model from the checkpoint in DIR wherever tensor names and shapes agree
    /// (two-stage training: e.g. a w1a1 model from a trained float or w1 one; the activation
    /// thresholds it lacks start at 0). The schedule and optimizer start afresh.
    #[arg(long, value_name = "DIR")]
    #[serde(default)]
    pub init: Option<PathBuf>,
    /// Knowledge distillation from the trained model in DIR (e.g. the float run of the same
    /// data set): the loss becomes (1 - a) cross-entropy + a T^2 KL(teacher || student) at
    /// temperature T, on the same augmented batches. The teacher runs in evaluation mode.
    #[arg(long, value_name = "DIR")]
    #[serde(default)]
    pub distill: Option<PathBuf>,
    /// Weight `a` of the distillation term, in [0, 1].
    #[arg(long, default_value_t = 0.9)]
    #[serde(default = "default_distill_weight")]
    pub distill_weight: f32,
    /// Distillation temperature `T` (> 0).
    #[arg(long, default_value_t = 4.0)]
    #[serde(default = "default_distill_temperature")]
    pub distill_temperature: f32,
    /// Continue the run saved in DIR from its last completed epoch (other options are taken
    /// from the saved run).
    #[arg(long, value_name = "DIR")]
    pub resume: Option<PathBuf>,
    /// Stop after this many epochs of this invocation (the schedule still spans --epochs);
    /// for testing resumption.
    #[arg(long, hide = true)]
    pub stop_after: Option<usize>,
    /// Print one JSON object on stdout instead of prose.
    #[arg(long)]
    #[serde(skip)]
    pub json: bool,
    /// No progress bar and no per-epoch lines.
    #[arg(long, short)]
    #[serde(skip)]
    pub quiet: bool,
    /// Where data sets are installed (default: $SBDNET_DATA, else the platform cache dir).
    #[arg(long, env = "SBDNET_DATA", value_name = "DIR")]
    #[serde(skip)]
    pub data_dir: Option<PathBuf>,
}

/// `sbdnet eval`.
#[derive(Args, Debug, Clone)]
pub struct EvalArgs {
    /// Checkpoint directory written by `sbdnet train`.
    pub dir: PathBuf,
    /// Data set (default: the one the model was trained on).
    #[arg(long)]
    pub dataset: Option<String>,
    /// First re-estimate batch-norm statistics over this many training batches of 256
    /// (in data-set order, unaugmented); 0 evaluates the checkpoint as saved.
    #[arg(long, default_value_t = 0)]
    pub bn_recalibrate: usize,
    /// Worker threads.
    #[arg(long)]
    pub threads: Option<usize>,
    /// Print one JSON object on stdout (key `accuracy`, a fraction).
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    #[allow(missing_docs)]
    pub data: DataOpts,
}

/// `sbdnet bench ...`.
#[derive(Subcommand, Debug)]
pub enum BenchCommand {
    /// Time training steps (forward, backward, optimizer) on random data.
    Train(BenchTrainArgs),
    /// Time one sparse or dense linear layer (diagonal, CSR, dense, masked dense).
    Linear(crate::bench_linear::BenchLinearArgs),
    /// Time a deployed `.sbd` model (warm-up, then median and p90 latency per batch).
    Model(BenchModelArgs),
}

/// `sbdnet bench model`.
#[derive(Args, Debug, Clone)]
pub struct BenchModelArgs {
    /// A `.sbd` file written by `sbdnet export`.
    pub model: PathBuf,
    /// Images per run.
    #[arg(long, default_value_t = 1, value_parser = positive)]
    pub batch: usize,
    /// Worker threads.
    #[arg(long, default_value_t = 1)]
    pub threads: usize,
    /// Untimed runs first.
    #[arg(long, default_value_t = 50)]
    pub warmup: usize,
    /// Timed runs (at least this many, and at least --seconds).
    #[arg(long, default_value_t = 200, value_parser = positive)]
    pub iters: usize,
    /// Keep timing until this many seconds have passed.
    #[arg(long, default_value_t = 1.0)]
    pub seconds: f64,
    /// Binary layers on float inputs (w1 models): 8-bit add/subtract (int8) or float.
    #[arg(long, value_enum, default_value_t = A8Arg::Int8)]
    pub a8: A8Arg,
    /// Also print per-layer time (kernel, binary operations per second).
    #[arg(long)]
    pub profile: bool,
    /// Print one JSON object (`latency_us_median`, `latency_us_p90`, `images_per_s`, `layers`).
    #[arg(long)]
    pub json: bool,
}

/// How binary layers on float inputs run.
#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum A8Arg {
    /// Activations quantized to 8 bits, additions and subtractions only.
    Int8,
    /// Float emulation (weights +-1.0, float GEMM).
    Float,
}

/// `sbdnet bench train`.
#[derive(Args, Debug, Clone)]
pub struct BenchTrainArgs {
    #[command(flatten)]
    #[allow(missing_docs)]
    pub m: ModelArgs,
    /// Images per step.
    #[arg(long, default_value_t = 128)]
    pub batch_size: usize,
    /// Worker threads.
    #[arg(long, default_value_t = 2)]
    pub threads: usize,
    /// Input as HxWxC.
    #[arg(long, default_value = "28x28x1")]
    pub input: String,
    /// Timed steps.
    #[arg(long, default_value_t = 20)]
    pub steps: usize,
    /// Untimed warm-up steps.
    #[arg(long, default_value_t = 3)]
    pub warmup: usize,
    /// Also print time per layer (forward and backward).
    #[arg(long)]
    pub profile: bool,
    /// Print one JSON object (keys `step_ms_median`, `images_per_s`).
    #[arg(long)]
    pub json: bool,
}

/// `sbdnet data ...`.
#[derive(Subcommand, Debug)]
pub enum DataCommand {
    /// Install a data set (mnist, fashion-mnist) into the data directory and verify checksums.
    Fetch {
        /// mnist or fashion-mnist.
        name: String,
        #[command(flatten)]
        #[allow(missing_docs)]
        data: DataOpts,
        /// Print one JSON object.
        #[arg(long)]
        json: bool,
    },
    /// Show where data sets are looked for and which are installed.
    Info {
        #[command(flatten)]
        #[allow(missing_docs)]
        data: DataOpts,
        /// Print one JSON object.
        #[arg(long)]
        json: bool,
    },
}

/// How sw1/sw1a1 layers are pruned.
#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PruneArg {
    /// Clipped group lasso with weight penalty clipping (Sparse BD-Net), then pruning of the
    /// weakest groups on the schedule.
    Wpc,
    /// Plain magnitude pruning of groups on the same schedule: no lasso, no clipping (the
    /// baseline).
    Magnitude,
}

/// Group-sparse training options (precisions sw1 and sw1a1; see docs/SPARSE.md).
#[derive(Args, Debug, Clone, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct SparseTrainArgs {
    /// sw1/sw1a1: pruning method (default wpc).
    #[arg(long, value_enum)]
    pub prune: Option<PruneArg>,
    /// sw1/sw1a1: fraction of the grouped layers' weights in zero groups at the end of the
    /// pruning window (default 0.7); depthwise layers take --dw-sparsity, the pointwise (and
    /// ordinary) convolutions, uniformly, the rest.
    #[arg(long)]
    pub target_sparsity: Option<f64>,
    /// sw1/sw1a1: fraction of zero groups in depthwise convolutions, whose groups are whole
    /// kernels (a pruned kernel silences its channel).
    #[arg(long, default_value_t = 0.0)]
    pub dw_sparsity: f64,
    /// sw1/sw1a1, wpc: group-lasso strength lambda (after its warm-up).
    #[arg(long, default_value_t = 2e-3)]
    pub lasso_lambda: f32,
    /// sw1/sw1a1, wpc: weight penalty clipping ratio r: only groups with norm below
    /// r * (the layer's mean group norm) are penalized.
    #[arg(long, default_value_t = 0.6)]
    pub wpc_ratio: f32,
    /// sw1/sw1a1, wpc: epochs over which lambda rises linearly from 0.
    #[arg(long, default_value_t = 1.0)]
    pub lasso_warmup_epochs: f32,
    /// sw1/sw1a1: epoch at which gradual pruning starts (the cubic schedule reaches the target
    /// when fine-tuning starts).
    #[arg(long, default_value_t = 1.0)]
    pub prune_start_epochs: f32,
    /// sw1/sw1a1: last epochs, trained with the mask frozen and no lasso (default: a quarter
    /// of the run, at least 1).
    #[arg(long)]
    pub finetune_epochs: Option<usize>,
    /// sw1/sw1a1: steps between pruning updates.
    #[arg(long, default_value_t = 50)]
    pub prune_every: usize,
    /// sw1/sw1a1: also prune, at every update, each group whose root mean square latent weight
    /// is below this threshold (0: off).
    #[arg(long, default_value_t = 0.0)]
    pub prune_eps: f32,
    /// sw1/sw1a1, wpc: while the lasso is on, scale each group below the clipping threshold
    /// by its norm / threshold in the forward pass, so that a group the lasso shrinks fades
    /// out instead of keeping full-size binary weights with random signs (docs/SPARSE.md).
    #[arg(long)]
    pub lasso_fade: bool,
}

impl Default for SparseTrainArgs {
    fn default() -> Self {
        SparseTrainArgs {
            prune: None,
            target_sparsity: None,
            dw_sparsity: 0.0,
            lasso_lambda: 2e-3,
            wpc_ratio: 0.6,
            lasso_warmup_epochs: 1.0,
            prune_start_epochs: 1.0,
            finetune_epochs: None,
            prune_every: 50,
            prune_eps: 0.0,
            lasso_fade: false,
        }
    }
}

fn default_distill_weight() -> f32 {
    0.9
}

fn default_distill_temperature() -> f32 {
    4.0
}

/// A count that must be at least 1 (`--batch`, `--iters`, `--limit`): refused by the parser
/// with the reason.
fn positive(s: &str) -> Result<usize, String> {
    match s.parse::<usize>() {
        Ok(0) => Err("must be at least 1".into()),
        Ok(n) => Ok(n),
        Err(e) => Err(e.to_string()),
    }
}

//! Command-line definitions.

use clap::{Args, Parser, Subcommand, ValueEnum};
use std::path::PathBuf;

/// sbdnet: train and run binarized, sparse-binarized and diagonal-sparse neural networks.
///
/// Start with `sbdnet train` (dscnn on the built-in 8x8 digits, about a minute), then
/// `sbdnet data fetch mnist` and `sbdnet train --dataset mnist --epochs 15 --out runs/mnist`.
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
            Command::Data(_) => Some(1),
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

/// `sbdnet train`.
#[derive(Args, Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct TrainArgs {
    /// Model: dscnn (depthwise-separable CNN) or cnn (ordinary 3x3 convolutions, the baseline).
    #[arg(long, default_value = "dscnn")]
    pub model: String,
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
    /// Data augmentation.
    #[arg(long, value_enum, default_value_t = AugArg::Auto)]
    pub augment: AugArg,
    /// Seed for initialization, shuffling, augmentation and dropout.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Worker threads (default: all cores). Same seed and threads give bit-identical weights.
    #[arg(long)]
    pub threads: Option<usize>,
    /// Directory for checkpoint and metrics.jsonl (default: runs/<model>-<dataset>).
    #[arg(long, value_name = "DIR")]
    pub out: Option<PathBuf>,
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
}

/// `sbdnet bench train`.
#[derive(Args, Debug, Clone)]
pub struct BenchTrainArgs {
    /// Model.
    #[arg(long, default_value = "dscnn")]
    pub model: String,
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

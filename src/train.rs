//! `sbdnet train`, `sbdnet eval`, `sbdnet data`.

use crate::cli::{AugArg, DataCommand, EvalArgs, OptArg, PruneArg, SchedArg, SparseTrainArgs, TrainArgs};
use anyhow::{bail, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use sbdnet_data::{Dataset, DatasetKind};
use sbdnet_kernels::rng::Rng;
use sbdnet_nn::checkpoint::{self, Checkpoint};
use sbdnet_nn::{Loss, Model, ModelConfig, Optimizer, OptimizerConfig, OptimizerKind, Schedule, ScheduleKind};
use serde::{Deserialize, Serialize};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// RNG stream ids.
const SHUFFLE: u64 = 1;
const AUGMENT: u64 = 2;

/// What a run saves besides tensors, enough to resume it exactly.
#[derive(Serialize, Deserialize, Debug, Clone)]
struct RunState {
    args: TrainArgs,
    epochs: usize,
    completed_epochs: usize,
    model_step: u64,
    mean: Vec<f32>,
    std: Vec<f32>,
    test_accuracy: Option<f32>,
}

impl RunState {
    /// The saved normalization, checked against the data set's channel count (the training
    /// state is JSON metadata, outside the data checksum, so an edited file reaches here).
    fn normalization(&self, channels: usize, dir: &Path) -> Result<(Vec<f32>, Vec<f32>)> {
        let ok = |v: &[f32]| v.len() == channels && v.iter().all(|x| x.is_finite());
        anyhow::ensure!(
            ok(&self.mean) && ok(&self.std) && self.std.iter().all(|&s| s > 0.0),
            "the training state in {} has a damaged normalization ({} means and {} standard \
             deviations for {channels} input channels; each must be finite, deviations positive): \
             the checkpoint's metadata was edited or corrupted; train the run again",
            dir.display(),
            self.mean.len(),
            self.std.len()
        );
        Ok((self.mean.clone(), self.std.clone()))
    }
}

/// One line of metrics.jsonl.
#[derive(Serialize, Debug, Clone)]
struct EpochMetrics {
    epoch: usize,
    train_loss: f32,
    train_acc: f32,
    test_loss: f32,
    test_acc: f32,
    images_per_s: f32,
    seconds: f32,
    lr: f32,
    /// Weights in use in the sparse layers (all of them), at the end of the epoch.
    #[serde(skip_serializing_if = "Option::is_none")]
    nnz: Option<usize>,
    /// Per sparse layer: name, kind, nnz, budget, dense size.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    sparse_layers: Vec<sbdnet_nn::SparseInfo>,
    /// sw1/sw1a1: fraction of the grouped layers' weights in pruned groups, end of epoch.
    #[serde(skip_serializing_if = "Option::is_none")]
    sparsity: Option<f64>,
    /// sw1/sw1a1: pruned groups (all layers).
    #[serde(skip_serializing_if = "Option::is_none")]
    zero_groups: Option<usize>,
    /// sw1/sw1a1: mean group-lasso penalty sum_layers R over the epoch's steps (without lambda).
    #[serde(skip_serializing_if = "Option::is_none")]
    lasso: Option<f64>,
    /// sw1/sw1a1: lambda at the epoch's last step.
    #[serde(skip_serializing_if = "Option::is_none")]
    lambda: Option<f32>,
}

/// The group-sparse schedule of a sw1/sw1a1 run, in optimizer steps (see docs/SPARSE.md).
#[derive(Clone, Copy, Debug)]
struct SparsePlan {
    method: PruneArg,
    target: f64,
    dw_target: f64,
    lambda: f32,
    ratio: f32,
    eps: f32,
    fade: bool,
    lasso_warmup: usize,
    /// Pruning window `[t0, t1]`; from `t1` on the mask is frozen and the lasso off.
    t0: usize,
    t1: usize,
    every: usize,
}

impl SparsePlan {
    fn new(s: &SparseTrainArgs, epochs: usize, spe: usize) -> Result<Self> {
        let target = s.target_sparsity.unwrap_or(0.7);
        anyhow::ensure!((0.0..1.0).contains(&target), "--target-sparsity must be in [0, 1), got {target}");
        anyhow::ensure!((0.0..1.0).contains(&s.dw_sparsity), "--dw-sparsity must be in [0, 1), got {}", s.dw_sparsity);
        anyhow::ensure!(s.lasso_lambda >= 0.0 && s.lasso_lambda.is_finite(), "--lasso-lambda must be >= 0");
        anyhow::ensure!(s.wpc_ratio > 0.0 && s.wpc_ratio.is_finite(), "--wpc-ratio must be > 0");
        anyhow::ensure!(s.prune_every >= 1, "--prune-every must be at least 1");
        anyhow::ensure!(s.prune_eps >= 0.0, "--prune-eps must be >= 0");
        let method = s.prune.unwrap_or(PruneArg::Wpc);
        anyhow::ensure!(
            !s.lasso_fade || (method == PruneArg::Wpc && s.lasso_lambda > 0.0),
            "--lasso-fade fades the groups the lasso pushes down: it needs --prune wpc and --lasso-lambda > 0"
        );
        let ft = s.finetune_epochs.unwrap_or((epochs / 4).max(1));
        anyhow::ensure!(
            ft < epochs,
            "--finetune-epochs ({ft}) must be less than --epochs ({epochs}): pruning needs at least one epoch"
        );
        let t1 = (epochs - ft) * spe;
        let t0 = ((s.prune_start_epochs.max(0.0) * spe as f32) as usize).min(t1 / 2);
        Ok(SparsePlan {
            method,
            target,
            dw_target: s.dw_sparsity,
            lambda: s.lasso_lambda,
            ratio: s.wpc_ratio,
            eps: s.prune_eps,
            fade: s.lasso_fade,
            lasso_warmup: (s.lasso_warmup_epochs.max(0.0) * spe as f32) as usize,
            t0,
            t1,
            every: s.prune_every,
        })
    }

    /// lambda for step `t` (0-based): linear warm-up, constant, 0 when fine-tuning (and for
    /// the magnitude baseline).
    fn lambda(&self, t: usize) -> f32 {
        if self.method == PruneArg::Magnitude || t >= self.t1 {
            return 0.0;
        }
        self.lambda * ((t + 1) as f32 / self.lasso_warmup.max(1) as f32).min(1.0)
    }

    /// The fade ratio for step `t`: the clipping ratio while the lasso is on with
    /// `--lasso-fade`, else `None`.
    fn fade(&self, t: usize) -> Option<f32> {
        (self.fade && self.lambda(t) > 0.0).then_some(self.ratio)
    }

    /// After `done` optimizer steps: the pruning targets to apply now, if any.
    fn prune_now(&self, done: usize) -> Option<(f64, f64)> {
        if done < self.t0 || done > self.t1 || !(done.is_multiple_of(self.every) || done == self.t1) {
            return None;
        }
        let f = |target| sbdnet_nn::group::cubic_sparsity(target, done, self.t0, self.t1);
        Some((f(self.target), f(self.dw_target)))
    }
}

pub fn data_dir(opt: &Option<PathBuf>) -> PathBuf {
    opt.clone().unwrap_or_else(sbdnet_data::default_data_dir)
}

pub(crate) fn load_split(name: &str, dir: &Path) -> Result<(DatasetKind, sbdnet_data::Split)> {
    let kind: DatasetKind = name.parse()?;
    let split = sbdnet_data::load(kind, dir)?;
    Ok((kind, split))
}

/// Zero-pad both splits to `size x size` (e.g. 28x28 images for a 32x32 model).
pub(crate) fn pad_split(split: &mut sbdnet_data::Split, size: usize) -> Result<()> {
    if split.train.height < size || split.train.width < size {
        split.train = split.train.pad_to(size, size)?;
        split.test = split.test.pad_to(size, size)?;
    }
    Ok(())
}

/// A data set normalized once into f32 NHWC.
pub(crate) struct Prepared {
    pub x: Vec<f32>,
    pub y: Vec<u8>,
    pub il: usize,
    pub h: usize,
    pub w: usize,
    pub c: usize,
}

pub(crate) fn prepare(d: &Dataset, mean: &[f32], std: &[f32]) -> Prepared {
    let mut x = vec![0.0; d.images.len()];
    sbdnet_data::normalize_into(&d.images, &mut x, mean, std);
    Prepared { x, y: d.labels.clone(), il: d.image_len(), h: d.height, w: d.width, c: d.channels }
}

fn augmentation(kind: DatasetKind, a: AugArg) -> (isize, bool) {
    match a {
        AugArg::None => (0, false),
        AugArg::Shift => (2, false),
        AugArg::ShiftFlip => (2, true),
        AugArg::Auto => match kind {
            DatasetKind::Digits => (1, false),
            DatasetKind::Mnist => (2, false),
            DatasetKind::FashionMnist => (2, true),
            DatasetKind::Cifar10 => (4, true),
        },
    }
}

fn optimizer_config(a: &TrainArgs) -> OptimizerConfig {
    let kind = match a.optimizer {
        OptArg::Sgd => OptimizerKind::Sgd,
        OptArg::Adam => OptimizerKind::Adam,
        OptArg::Adamw => OptimizerKind::AdamW,
    };
    OptimizerConfig { kind, weight_decay: a.weight_decay, ..OptimizerConfig::default() }
}

fn default_lr(a: &TrainArgs) -> f32 {
    a.lr.unwrap_or(if a.optimizer == OptArg::Sgd { 0.1 } else { 2e-3 })
}

fn prose_wanted(a: &TrainArgs) -> bool {
    !a.json && !a.quiet
}

/// Evaluate on a prepared set in batches of the model's capacity.
fn evaluate(model: &mut Model, data: &Prepared) -> Result<(f32, f32)> {
    let cap = model.capacity();
    let (mut loss, mut correct) = (0.0f64, 0usize);
    let n = data.y.len();
    let mut i = 0;
    while i < n {
        let b = cap.min(n - i);
        let s = model.eval_batch(&data.x[i * data.il..(i + b) * data.il], &data.y[i..i + b])?;
        loss += s.loss as f64 * b as f64;
        correct += s.correct;
        i += b;
    }
    Ok(((loss / n.max(1) as f64) as f32, correct as f32 / n.max(1) as f32))
}

/// Train as `a` says; progress on stderr unless quiet or JSON.
/// The `--distill` teacher: the model saved in `dir`, checked against the student's input and
/// classes, in evaluation mode; its test accuracy is printed.
fn load_teacher(dir: &std::path::Path, student: &Model, batch: usize, a: &TrainArgs, test: &Prepared) -> Result<Model> {
    anyhow::ensure!(
        (0.0..=1.0).contains(&a.distill_weight),
        "--distill-weight must be in [0, 1] (got {})",
        a.distill_weight
    );
    anyhow::ensure!(
        a.distill_temperature.is_finite() && a.distill_temperature > 0.0,
        "--distill-temperature must be a positive number (got {})",
        a.distill_temperature
    );
    let ck =
        Checkpoint::read(dir).with_context(|| format!("--distill: cannot read the teacher in {}", dir.display()))?;
    if ck.config.input != student.config.input || ck.config.classes != student.config.classes {
        bail!(
            "--distill: the teacher in {} takes {:?} inputs with {} classes, this run {:?} with {}",
            dir.display(),
            ck.config.input,
            ck.config.classes,
            student.config.input,
            student.config.classes
        );
    }
    let mut t = Model::new(ck.config.clone(), batch, a.seed)?;
    ck.apply(&mut t, None, &dir.join(checkpoint::WEIGHTS_FILE))
        .with_context(|| format!("--distill: cannot load the teacher's weights from {}", dir.display()))?;
    if prose_wanted(a) {
        let (_, acc) = evaluate(&mut t, test)?;
        eprintln!(
            "distilling from {} ({} {}, test accuracy {:.2}%): weight {}, temperature {}",
            dir.display(),
            ck.config.name,
            ck.config.quant.precision.name(),
            100.0 * acc,
            a.distill_weight,
            a.distill_temperature
        );
    }
    Ok(t)
}

pub fn run_training(mut a: TrainArgs) -> Result<Outcome> {
    let (json, quiet, threads, stop_after, ddir) = (a.json, a.quiet, a.threads, a.stop_after, a.data_dir.clone());
    let mut resume: Option<(Checkpoint, RunState, PathBuf)> = None;
    if let Some(dir) = a.resume.clone() {
        let ck = Checkpoint::read(&dir).with_context(|| format!("cannot resume from {}", dir.display()))?;
        let st: RunState = serde_json::from_value(ck.train_state().context("checkpoint has no training state")?)
            .context("checkpoint's training state is not readable")?;
        if threads.is_some() && st.args.threads != threads {
            eprintln!(
                "note: resuming with a different --threads than the original run; weights may differ in the last bits"
            );
        }
        a = st.args.clone();
        a.out = Some(dir.clone());
        resume = Some((ck, st, dir));
    }
    a.json = json;
    a.quiet = quiet;
    a.stop_after = stop_after;
    a.data_dir = ddir;
    let dir = data_dir(&a.data_dir);
    let (kind, mut split) = load_split(&a.dataset, &dir)?;
    let model_name = match &resume {
        Some((ck, _, _)) => ck.config.name.clone(),
        None => a.m.model.clone(),
    };
    if let Some(size) = ModelConfig::preferred_input_size(&model_name) {
        pad_split(&mut split, size)?;
    }
    let epochs = a.epochs.unwrap_or(if kind == DatasetKind::Digits { 30 } else { 15 });
    anyhow::ensure!(epochs >= 1, "--epochs must be at least 1");
    anyhow::ensure!(a.batch_size >= 1, "--batch-size must be at least 1");
    anyhow::ensure!((0.0..1.0).contains(&a.label_smoothing), "--label-smoothing must be in [0, 1)");
    let out = a.out.clone().unwrap_or_else(|| {
        let linear = match a.m.linear {
            crate::cli::LinearArg::Dense => String::new(),
            l => format!("-{}{}", l.name(), (a.m.sparsity * 100.0).round()),
        };
        PathBuf::from(format!("runs/{}{linear}-{}-{}", a.m.model, a.m.precision, kind.name()))
    });
    a.out = Some(out.clone());
    a.epochs = Some(epochs);

    let (mean, std) = match &resume {
        Some((ck, st, dir)) => st.normalization(ck.config.input[2], dir)?,
        None => split.train.channel_stats(),
    };
    let train = prepare(&split.train, &mean, &std);
    let test = prepare(&split.test, &mean, &std);
    let n_train = train.y.len();
    let batch = a.batch_size.min(n_train);
    anyhow::ensure!(n_train >= 1, "the training set is empty");
    let steps_per_epoch = n_train / batch;
    let cfg = match &resume {
        Some((ck, _, _)) => ck.config.clone(),
        None => a.m.config([train.h, train.w, train.c], kind.classes())?,
    };
    let mut model = Model::new(cfg, batch, a.seed)?;
    let mut opt = Optimizer::new(optimizer_config(&a), model.params.len());
    if let (Some(dir), None) = (&a.init, &resume) {
        let ck = Checkpoint::read(dir).with_context(|| format!("--init: cannot read {}", dir.display()))?;
        if ck.config.input != model.config.input || ck.config.classes != model.config.classes {
            bail!(
                "--init: the model in {} takes {:?} inputs with {} classes, this run {:?} with {}",
                dir.display(),
                ck.config.input,
                ck.config.classes,
                model.config.input,
                model.config.classes
            );
        }
        let (copied, skipped) = ck.apply_matching(&mut model);
        anyhow::ensure!(copied > 0, "--init: no tensor of {} fits this model", dir.display());
        if prose_wanted(&a) {
            eprintln!(
                "initialized {copied} tensors from {}; {} kept their initial values{}",
                dir.display(),
                skipped.len(),
                if skipped.is_empty() { String::new() } else { format!(" ({})", skipped.join(", ")) }
            );
        }
    }
    let mut teacher = match &a.distill {
        Some(dir) => Some(load_teacher(dir, &model, batch, &a, &test)?),
        None => None,
    };
    let mut teacher_logits = vec![0.0f32; if teacher.is_some() { batch * model.config.classes } else { 0 }];
    let mut start_epoch = 0;
    if let Some((ck, st, dir)) = &resume {
        ck.apply(&mut model, Some(&mut opt), &dir.join(checkpoint::WEIGHTS_FILE))?;
        model.step = st.model_step;
        start_epoch = st.completed_epochs;
        if start_epoch >= epochs {
            bail!("the run in {} already completed all {epochs} epochs", dir.display());
        }
    }
    let schedule = Schedule {
        kind: match a.schedule {
            SchedArg::Cosine => ScheduleKind::Cosine,
            SchedArg::Constant => ScheduleKind::Constant,
            SchedArg::Step => ScheduleKind::Step { every: epochs.div_ceil(3).max(1), gamma: 0.1 },
        },
        base_lr: default_lr(&a),
        min_lr: 0.0,
        warmup_steps: (a.warmup_epochs.max(0.0) * steps_per_epoch as f32) as usize,
        total_steps: epochs * steps_per_epoch,
        steps_per_epoch,
    };
    let sparse_plan = if model.config.quant.precision.sparse() {
        Some(SparsePlan::new(&a.sparse, epochs, steps_per_epoch)?)
    } else {
        anyhow::ensure!(
            a.sparse.prune.is_none() && a.sparse.target_sparsity.is_none(),
            "--prune and --target-sparsity need --precision sw1 or sw1a1 (group-sparse binary weights)"
        );
        None
    };
    if let Some(plan) = &sparse_plan {
        let f = model.pointwise_fraction(plan.target, plan.dw_target);
        anyhow::ensure!(
            f < 1.0,
            "--target-sparsity {} with --dw-sparsity {} would prune every group of every pointwise layer \
             (the depthwise kernels hold too large a share of {}'s grouped weights); lower --target-sparsity or raise --dw-sparsity",
            plan.target,
            plan.dw_target,
            model.config.name
        );
    }
    let loss_fn = Loss { label_smoothing: a.label_smoothing };
    let (shift, flip) = augmentation(kind, a.augment);
    std::fs::create_dir_all(&out).with_context(|| format!("cannot create output directory {}", out.display()))?;
    let metrics_path = out.join("metrics.jsonl");
    if resume.is_none() {
        std::fs::write(&metrics_path, b"").with_context(|| format!("cannot write {}", metrics_path.display()))?;
    }
    let prose = !json && !quiet;
    if prose {
        eprintln!(
            "training {} {} ({} linear{}) on {} ({} train / {} test images of {}x{}x{}), {} parameters, {epochs} epochs x {steps_per_epoch} steps of {batch}, {} threads, kernels: {}",
            a.m.model,
            a.m.precision,
            a.m.linear.name(),
            if model.config.has_sparse() { format!(" at sparsity {}", a.m.sparsity) } else { String::new() },
            kind.name(),
            n_train,
            test.y.len(),
            train.h,
            train.w,
            train.c,
            model.params.len(),
            rayon::current_num_threads(),
            sbdnet_kernels::kernel_path().name()
        );
    }

    let il = train.il;
    let mut xb = vec![0.0f32; batch * il];
    let mut yb = vec![0u8; batch];
    let mut order: Vec<usize> = (0..n_train).collect();
    let run_start = Instant::now();
    let mut last: Option<EpochMetrics> = None;
    for epoch in start_epoch..epochs {
        let t0 = Instant::now();
        for (i, o) in order.iter_mut().enumerate() {
            *o = i;
        }
        Rng::derive(a.seed, SHUFFLE, epoch as u64).shuffle(&mut order);
        let mut aug = Rng::derive(a.seed, AUGMENT, epoch as u64);
        let bar = if prose {
            let pb = ProgressBar::new(steps_per_epoch as u64);
            pb.set_style(
                ProgressStyle::with_template(
                    "epoch {prefix} {bar:30} {pos}/{len} {msg} [{elapsed_precise}<{eta_precise}]",
                )
                .expect("valid template"),
            );
            pb.set_prefix(format!("{}/{epochs}", epoch + 1));
            pb
        } else {
            ProgressBar::hidden()
        };
        let (mut loss_sum, mut correct, mut seen) = (0.0f64, 0usize, 0usize);
        let mut lasso_sum = 0.0f64;
        for s in 0..steps_per_epoch {
            for j in 0..batch {
                let idx = order[s * batch + j];
                yb[j] = train.y[idx];
                let src = &train.x[idx * il..(idx + 1) * il];
                let dst = &mut xb[j * il..(j + 1) * il];
                if shift > 0 || flip {
                    let dy = aug.below(2 * shift as usize + 1) as isize - shift;
                    let dx = aug.below(2 * shift as usize + 1) as isize - shift;
                    let f = flip && aug.below(2) == 1;
                    sbdnet_data::shift_flip(src, dst, train.h, train.w, train.c, dy, dx, f);
                } else {
                    dst.copy_from_slice(src);
                }
            }
            let global_step = epoch * steps_per_epoch + s;
            let lr = schedule.lr(global_step);
            if let Some(plan) = &sparse_plan {
                model.set_group_fade(plan.fade(global_step));
            }
            let st = match teacher.as_mut() {
                Some(t) => {
                    teacher_logits.copy_from_slice(t.forward(&xb, batch, false)?);
                    let soft = Some((&teacher_logits[..], a.distill_weight, a.distill_temperature));
                    model.train_step_distilled(&xb, &yb, &loss_fn, soft)?
                }
                None => model.train_step(&xb, &yb, &loss_fn)?,
            };
            if !st.loss.is_finite() {
                bar.abandon();
                let kept = if epoch > 0 {
                    format!("the checkpoint of epoch {epoch} in {} is kept", out.display())
                } else {
                    "no checkpoint was written yet".to_string()
                };
                bail!(
                    "training diverged: the loss became {} at epoch {}, step {} (learning rate {lr:.4}); {kept}. Try a lower --lr (now {}) or a longer --warmup-epochs.",
                    st.loss,
                    epoch + 1,
                    s + 1,
                    schedule.base_lr
                );
            }
            if let Some(plan) = &sparse_plan {
                let lambda = plan.lambda(global_step);
                if plan.method == PruneArg::Wpc {
                    lasso_sum += model.group_penalty(lambda, plan.ratio);
                }
            }
            opt.step(&mut model.params, lr);
            if let Some((f, fdw)) = sparse_plan.as_ref().and_then(|p| p.prune_now(global_step + 1)) {
                let eps = sparse_plan.as_ref().map_or(0.0, |p| p.eps);
                model.prune_groups(f, fdw, eps, Some(&mut opt));
            }
            model.after_step(global_step + 1, schedule.total_steps, &mut opt);
            loss_sum += st.loss as f64 * st.n as f64;
            correct += st.correct;
            seen += st.n;
            if s % 4 == 0 || s + 1 == steps_per_epoch {
                let secs = t0.elapsed().as_secs_f64();
                bar.set_message(format!(
                    "loss {:.4} acc {:.2}% {:.0} img/s",
                    loss_sum / seen as f64,
                    100.0 * correct as f64 / seen as f64,
                    seen as f64 / secs
                ));
            }
            bar.inc(1);
        }
        let train_secs = t0.elapsed().as_secs_f32();
        bar.finish_and_clear();
        // Evaluate (and save) the model as deployed: no fading.
        model.set_group_fade(None);
        // Batch-norm re-estimation on the first batches of this epoch's order, unaugmented.
        let recal = a.bn_recalibrate.unwrap_or(if model.config.quant.precision.binary_weights() { 100 } else { 0 });
        if recal > 0 {
            model.set_bn_recalibration(true);
            for s in 0..recal.min(steps_per_epoch) {
                for j in 0..batch {
                    let idx = order[s * batch + j];
                    xb[j * il..(j + 1) * il].copy_from_slice(&train.x[idx * il..(idx + 1) * il]);
                }
                model.forward(&xb, batch, true)?;
            }
            model.set_bn_recalibration(false);
        }
        let (test_loss, test_acc) = evaluate(&mut model, &test)?;
        let m = EpochMetrics {
            epoch: epoch + 1,
            train_loss: (loss_sum / seen.max(1) as f64) as f32,
            train_acc: correct as f32 / seen.max(1) as f32,
            test_loss,
            test_acc,
            images_per_s: seen as f32 / train_secs,
            seconds: t0.elapsed().as_secs_f32(),
            lr: schedule.lr((epoch + 1) * steps_per_epoch - 1),
            nnz: None,
            sparse_layers: model.sparse_layers(),
            sparsity: None,
            zero_groups: None,
            lasso: sparse_plan.map(|_| lasso_sum / steps_per_epoch.max(1) as f64),
            lambda: sparse_plan.map(|p| p.lambda((epoch + 1) * steps_per_epoch - 1)),
        };
        let groups = model.group_layers();
        let m = if groups.is_empty() {
            m
        } else {
            let (w, z) = groups.iter().fold((0, 0), |(w, z), g| (w + g.weights, z + g.zero_weights));
            EpochMetrics {
                sparsity: Some(z as f64 / w.max(1) as f64),
                zero_groups: Some(groups.iter().map(|g| g.zero_groups).sum()),
                ..m
            }
        };
        let m = EpochMetrics {
            nnz: (!m.sparse_layers.is_empty()).then(|| m.sparse_layers.iter().map(|l| l.nnz).sum()),
            ..m
        };
        let state = RunState {
            args: a.clone(),
            epochs,
            completed_epochs: epoch + 1,
            model_step: model.step,
            mean: mean.clone(),
            std: std.clone(),
            test_accuracy: Some(test_acc),
        };
        checkpoint::save(&out, &model, Some(&opt), &serde_json::to_string(&state)?)?;
        let mut f = std::fs::OpenOptions::new().append(true).create(true).open(&metrics_path)?;
        writeln!(f, "{}", serde_json::to_string(&m)?)?;
        if prose {
            let nnz = match m.nnz {
                Some(z) => {
                    let budget: usize = m.sparse_layers.iter().map(|l| l.target_nnz).sum();
                    format!("  nnz {z} (budget {budget})")
                }
                None => String::new(),
            };
            let nnz = match m.sparsity {
                Some(sp) => format!("{nnz}  group sparsity {:.1}%", 100.0 * sp),
                None => nnz,
            };
            eprintln!(
                "epoch {:>3}/{epochs}  train loss {:.4} acc {:6.2}%  test loss {:.4} acc {:6.2}%  {:.0} img/s  {:.1}s{nnz}",
                m.epoch,
                m.train_loss,
                100.0 * m.train_acc,
                m.test_loss,
                100.0 * m.test_acc,
                m.images_per_s,
                m.seconds
            );
        }
        last = Some(m);
        if stop_after.is_some_and(|s| epoch + 1 - start_epoch >= s) {
            break;
        }
    }
    let m = last.context("no epoch was run")?;
    let outcome = Outcome {
        model: a.m.model.clone(),
        precision: a.m.precision.clone(),
        dataset: kind.name().to_string(),
        epochs: m.epoch,
        test_accuracy: m.test_acc,
        test_loss: m.test_loss,
        train_accuracy: m.train_acc,
        train_loss: m.train_loss,
        images_per_s: m.images_per_s,
        seconds: run_start.elapsed().as_secs_f32(),
        parameters: model.params.len(),
        linear: a.m.linear.name().to_string(),
        nnz: m.nnz,
        sparsity: m.sparsity,
        zero_groups: m.zero_groups,
        out: out.display().to_string(),
    };
    Ok(outcome)
}

/// What a finished training run reports.
#[derive(Serialize, Debug, Clone)]
pub struct Outcome {
    model: String,
    precision: String,
    dataset: String,
    epochs: usize,
    test_accuracy: f32,
    test_loss: f32,
    train_accuracy: f32,
    train_loss: f32,
    images_per_s: f32,
    seconds: f32,
    parameters: usize,
    linear: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    nnz: Option<usize>,
    /// sw1/sw1a1: fraction of the grouped layers' weights in pruned groups.
    #[serde(skip_serializing_if = "Option::is_none")]
    sparsity: Option<f64>,
    /// sw1/sw1a1: pruned groups.
    #[serde(skip_serializing_if = "Option::is_none")]
    zero_groups: Option<usize>,
    out: String,
}

pub fn train(a: TrainArgs) -> Result<()> {
    let json = a.json;
    let o = run_training(a)?;
    if json {
        println!("{}", serde_json::to_string(&o)?);
    } else {
        let sparsity = match o.sparsity {
            Some(sp) => format!(", group sparsity {:.1}%", 100.0 * sp),
            None => String::new(),
        };
        println!(
            "{} {} on {}: test accuracy {:.2}%{sparsity} after {} epochs ({:.1} s); checkpoint in {}",
            o.model,
            o.precision,
            o.dataset,
            100.0 * o.test_accuracy,
            o.epochs,
            o.seconds,
            o.out
        );
    }
    Ok(())
}

/// `sbdnet demo`: dscnn at float, at w1 and at sw1 (70% group sparsity) on the built-in
/// digits, side by side.
pub fn demo(a: crate::cli::DemoArgs) -> Result<()> {
    let mut rows = Vec::new();
    for precision in ["float", "w1", "sw1"] {
        let mut args = TrainArgs::default_for("dscnn", "digits");
        args.m.precision = precision.to_string();
        args.epochs = Some(a.epochs);
        args.threads = a.threads;
        args.quiet = a.json;
        args.out = Some(a.out.join(format!("dscnn-{precision}")));
        if !a.json {
            eprintln!("== dscnn {precision} on the built-in 8x8 digits ==");
        }
        rows.push(run_training(args)?);
    }
    if a.json {
        println!("{}", serde_json::json!({ "runs": rows }));
        return Ok(());
    }
    println!("\n{:<8} {:<10} {:>14} {:>16} {:>9}", "model", "precision", "test accuracy", "group sparsity", "seconds");
    for o in &rows {
        let sp = o.sparsity.map_or("-".to_string(), |s| format!("{:.1}%", 100.0 * s));
        println!("{:<8} {:<10} {:>13.2}% {:>16} {:>9.1}", o.model, o.precision, 100.0 * o.test_accuracy, sp, o.seconds);
    }
    println!(
        "binary weights (w1) cost {:+.2} points against float, sparse binary weights (sw1) {:+.2}; checkpoints in {}",
        100.0 * (rows[1].test_accuracy - rows[0].test_accuracy),
        100.0 * (rows[2].test_accuracy - rows[0].test_accuracy),
        a.out.display()
    );
    Ok(())
}

/// A trained checkpoint with its test split, normalized as in training.
pub(crate) struct LoadedRun {
    pub model: Model,
    pub test: Prepared,
    pub kind: DatasetKind,
    pub mean: Vec<f32>,
    pub std: Vec<f32>,
}

/// Load a checkpoint directory and the test split of `dataset` (default: the one it was
/// trained on), normalized as in training; optionally re-estimate BatchNorm statistics over
/// `bn_recalibrate` training batches of 256 first.
pub(crate) fn load_run(
    dir: &Path,
    dataset: Option<&str>,
    data: &Option<PathBuf>,
    bn_recalibrate: usize,
) -> Result<LoadedRun> {
    let ck = Checkpoint::read(dir)?;
    let st: Option<RunState> = ck.train_state().and_then(|v| serde_json::from_value(v).ok());
    let name = dataset
        .map(str::to_string)
        .or_else(|| st.as_ref().map(|s| s.args.dataset.clone()))
        .context("--dataset is required: this checkpoint does not say what it was trained on")?;
    let (kind, mut split) = load_split(&name, &data_dir(data))?;
    let [ch, cw, _] = ck.config.input;
    if ch == cw && ch > split.test.height && ch > split.test.width {
        pad_split(&mut split, ch)?;
    }
    let (mean, std) = match &st {
        // Against the model's input channels: a data set of other inputs is reported by the
        // shape check below, not as damaged metadata.
        Some(s) => s.normalization(ck.config.input[2], dir)?,
        None => split.train.channel_stats(),
    };
    let test = prepare(&split.test, &mean, &std);
    let input = [test.h, test.w, test.c];
    if ck.config.input != input || ck.config.classes != kind.classes() {
        bail!(
            "the model in {} takes {:?} inputs with {} classes; {} has {:?} with {} classes",
            dir.display(),
            ck.config.input,
            ck.config.classes,
            kind.name(),
            input,
            kind.classes()
        );
    }
    let mut model = Model::new(ck.config.clone(), 256, 0)?;
    ck.apply(&mut model, None, &dir.join(checkpoint::WEIGHTS_FILE))?;
    if bn_recalibrate > 0 {
        let train = prepare(&split.train, &mean, &std);
        model.set_bn_recalibration(true);
        for x in train.x.chunks_exact(256 * train.il).take(bn_recalibrate) {
            model.forward(x, 256, true)?;
        }
        model.set_bn_recalibration(false);
    }
    Ok(LoadedRun { model, test, kind, mean, std })
}

/// Top-1 predictions of the training-time model over a prepared set.
pub(crate) fn predictions(model: &mut Model, data: &Prepared) -> Result<Vec<usize>> {
    let cap = model.capacity();
    let n = data.y.len();
    let mut out = Vec::with_capacity(n);
    let mut i = 0;
    while i < n {
        let b = cap.min(n - i);
        let logits = model.forward(&data.x[i * data.il..(i + b) * data.il], b, false)?;
        out.extend(logits.chunks_exact(logits.len() / b).map(argmax));
        i += b;
    }
    Ok(out)
}

/// Index of the largest value (the first on ties).
pub(crate) fn argmax(v: &[f32]) -> usize {
    let mut best = 0;
    for (i, &x) in v.iter().enumerate() {
        if x > v[best] {
            best = i;
        }
    }
    best
}

pub fn eval(a: EvalArgs) -> Result<()> {
    let LoadedRun { mut model, test, kind, .. } =
        load_run(&a.dir, a.dataset.as_deref(), &a.data.data_dir, a.bn_recalibrate)?;
    let t0 = Instant::now();
    let (loss, acc) = evaluate(&mut model, &test)?;
    let secs = t0.elapsed().as_secs_f32();
    if a.json {
        println!(
            "{}",
            serde_json::json!({"accuracy": acc, "loss": loss, "images": test.y.len(), "dataset": kind.name(), "seconds": secs})
        );
    } else {
        println!(
            "{}: accuracy {:.2}% on {} test images of {} (loss {loss:.4}, {secs:.2} s)",
            a.dir.display(),
            100.0 * acc,
            test.y.len(),
            kind.name()
        );
    }
    Ok(())
}

pub fn data(cmd: DataCommand) -> Result<()> {
    match cmd {
        DataCommand::Fetch { name, data, json } => {
            let kind: DatasetKind = name.parse()?;
            let dir = data_dir(&data.data_dir);
            let mut log = |s: &str| {
                if !json {
                    eprintln!("{s}");
                }
            };
            let path = sbdnet_data::fetch(kind, &dir, &mut log)?;
            if json {
                println!("{}", serde_json::json!({"dataset": kind.name(), "path": path.display().to_string()}));
            } else {
                println!("{} is installed in {}", kind.name(), path.display());
            }
        }
        DataCommand::Info { data, json } => {
            let dir = data_dir(&data.data_dir);
            let mut rows = Vec::new();
            for kind in [DatasetKind::Digits, DatasetKind::Mnist, DatasetKind::FashionMnist, DatasetKind::Cifar10] {
                let status = match sbdnet_data::load(kind, &dir) {
                    Ok(s) => format!("ready ({} train / {} test)", s.train.len(), s.test.len()),
                    Err(e) => format!("not available: {e}"),
                };
                rows.push((kind.name(), status));
            }
            if json {
                let obj: serde_json::Map<String, serde_json::Value> =
                    rows.iter().map(|(k, s)| (k.to_string(), serde_json::Value::String(s.clone()))).collect();
                println!("{}", serde_json::json!({"data_dir": dir.display().to_string(), "datasets": obj}));
            } else {
                println!("data directory: {}", dir.display());
                for (k, s) in rows {
                    println!("  {k:<14} {s}");
                }
            }
        }
    }
    Ok(())
}

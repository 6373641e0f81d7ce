//! `sbdnet export` and `sbdnet infer`: deployed models.

use crate::cli::{A8Arg, BenchModelArgs, ExportArgs, ExportFormat, InferArgs};
use crate::train::{argmax, data_dir, load_run, load_split, pad_split, predictions, prepare, LoadedRun};
use anyhow::{bail, Context, Result};
use sbdnet_runtime::{A8Mode, DeployedModel, Plan, PlanOptions};
use std::time::Instant;

pub fn export(a: ExportArgs) -> Result<()> {
    let (model, mean, std) = match &a.dir {
        Some(dir) => {
            let LoadedRun { model, mean, std, .. } =
                load_run(dir, a.dataset.as_deref(), &a.data.data_dir, a.bn_recalibrate)
                    .with_context(|| format!("cannot load the checkpoint in {}", dir.display()))?;
            (model, mean, std)
        }
        None => {
            let default = match sbdnet_nn::ModelConfig::preferred_input_size(&a.m.model) {
                Some(s) => format!("{s}x{s}x1"),
                None => "28x28x1".to_string(),
            };
            let input = crate::bench::parse_input(a.input.as_deref().unwrap_or(&default))?;
            let cfg = a.m.config(input, 10)?;
            let c = input[2];
            (sbdnet_nn::Model::new(cfg, 1, 0)?, vec![0.0; c], vec![1.0; c])
        }
    };
    if a.format == ExportFormat::Onnx {
        let bytes = crate::onnx::to_onnx(&model)?;
        sbdnet_nn::checkpoint::write_atomic(&a.out, &bytes)?;
        if a.json {
            println!(
                "{}",
                serde_json::json!({"path": a.out.display().to_string(), "bytes": bytes.len(), "format": "onnx"})
            );
        } else {
            println!("wrote {} (ONNX opset 13, float, {:.1} KiB)", a.out.display(), bytes.len() as f64 / 1024.0);
        }
        return Ok(());
    }
    let dm = crate::export::deploy(&model, &mean, &std)?;
    dm.save(&a.out)?;
    let bytes = std::fs::metadata(&a.out).map(|m| m.len()).unwrap_or(0);
    if a.json {
        println!(
            "{}",
            serde_json::json!({"path": a.out.display().to_string(), "bytes": bytes, "layers": dm.graph.layers.len(),
                "precision": dm.graph.precision})
        );
    } else {
        println!(
            "wrote {} ({} layers, {} precision, {:.1} KiB)",
            a.out.display(),
            dm.graph.layers.len(),
            dm.graph.precision,
            bytes as f64 / 1024.0
        );
    }
    Ok(())
}

pub fn infer(a: InferArgs) -> Result<()> {
    let dm = DeployedModel::load(&a.model)?;
    let (kind, mut split) = load_split(&a.dataset, &data_dir(&a.data.data_dir))?;
    let [h, w, c] = dm.graph.input;
    if h == w && h > split.test.height && w > split.test.width {
        pad_split(&mut split, h)?;
    }
    if [split.test.height, split.test.width, split.test.channels] != [h, w, c] || kind.classes() != dm.graph.classes {
        bail!(
            "{} takes {h}x{w}x{c} inputs with {} classes; {} has {}x{}x{} images with {} classes",
            a.model.display(),
            dm.graph.classes,
            kind.name(),
            split.test.height,
            split.test.width,
            split.test.channels,
            kind.classes()
        );
    }
    let mut test = prepare(&split.test, &dm.graph.mean, &dm.graph.std);
    let n = a.limit.unwrap_or(test.y.len()).min(test.y.len());
    test.y.truncate(n);
    test.x.truncate(n * test.il);
    let batch = a.batch;
    let t0 = Instant::now();
    let mut preds = Vec::with_capacity(n);
    let mut plan = Plan::new(&dm, batch, plan_options(a.a8))?;
    // On a worker of the thread pool, as in bench_model.
    rayon::scope(|_| -> Result<()> {
        for (x, chunk) in test.x.chunks(batch * test.il).zip(test.y.chunks(batch)) {
            let b = chunk.len();
            if a.reference {
                let logits = sbdnet_runtime::reference::run(&dm, x, b)?;
                preds.extend(logits.chunks_exact(dm.graph.classes).map(argmax));
            } else {
                let logits = plan.run(x, b)?;
                preds.extend(logits.chunks_exact(dm.graph.classes).map(argmax));
            }
        }
        Ok(())
    })?;
    let secs = t0.elapsed().as_secs_f64();
    let correct = preds.iter().zip(&test.y).filter(|(p, y)| **p == **y as usize).count();
    let acc = correct as f64 / n.max(1) as f64;
    let mut agreement = None;
    if let Some(dir) = &a.agree_with {
        let mut run = load_run(dir, Some(kind.name()), &a.data.data_dir, 0)?;
        run.test.y.truncate(n);
        run.test.x.truncate(n * run.test.il);
        let train_preds = predictions(&mut run.model, &run.test)?;
        let same = train_preds.iter().zip(&preds).filter(|(a, b)| a == b).count();
        agreement = Some((same, same as f64 / n.max(1) as f64));
    }
    if a.json {
        let mut o = serde_json::json!({"accuracy": acc, "images": n, "dataset": kind.name(), "seconds": secs,
            "executor": if a.reference { "reference" } else { "planned" }});
        if let Some((same, frac)) = agreement {
            o["agreement"] = serde_json::json!(frac);
            o["agreeing_images"] = serde_json::json!(same);
        }
        println!("{o}");
    } else {
        println!(
            "{}: accuracy {:.2}% on {n} test images of {} ({secs:.2} s)",
            a.model.display(),
            100.0 * acc,
            kind.name()
        );
        if let Some((same, frac)) = agreement {
            println!("agreement with the training-time model: {same}/{n} ({:.2}%)", 100.0 * frac);
        }
    }
    Ok(())
}

fn plan_options(a8: A8Arg) -> PlanOptions {
    PlanOptions { a8: if a8 == A8Arg::Float { A8Mode::Float } else { A8Mode::Int8 } }
}

/// Value at quantile `q` of sorted samples (nearest rank).
fn quantile(sorted: &[f64], q: f64) -> f64 {
    let i = ((sorted.len() as f64 * q).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i]
}

pub fn bench_model(a: BenchModelArgs) -> Result<()> {
    let dm = DeployedModel::load(&a.model)?;
    let batch = a.batch;
    let mut plan = Plan::new(&dm, batch, plan_options(a.a8))?;
    let il = dm.values[0].len();
    let mut rng = sbdnet_kernels::rng::Rng::new(7);
    let x: Vec<f32> = (0..batch * il).map(|_| rng.normal()).collect();
    // Time on a worker of the thread pool: the kernels' parallel loops then run on the
    // calling thread instead of waking the pool once per layer (which would dominate at
    // batch 1, 1 thread).
    let mut times = rayon::scope(|_| -> Result<Vec<f64>> {
        for _ in 0..a.warmup {
            plan.run(&x, batch)?;
        }
        plan.profile = a.profile;
        let mut times = Vec::with_capacity(a.iters);
        let start = Instant::now();
        while times.len() < a.iters || start.elapsed().as_secs_f64() < a.seconds {
            let t0 = Instant::now();
            std::hint::black_box(plan.run(std::hint::black_box(&x), batch)?);
            times.push(t0.elapsed().as_secs_f64() * 1e6);
        }
        Ok(times)
    })?;
    times.sort_by(f64::total_cmp);
    let (med, p90, min) = (quantile(&times, 0.5), quantile(&times, 0.9), times[0]);
    let ips = batch as f64 / (med * 1e-6);
    let runs = plan.runs().saturating_sub(a.warmup as u64).max(1) as f64;
    let layers: Vec<serde_json::Value> = plan
        .info
        .iter()
        .map(|l| {
            let us = l.ns as f64 / runs / 1e3;
            let gops = |macs: u64| if l.min_ns > 0 { macs as f64 * batch as f64 / l.min_ns as f64 } else { 0.0 };
            let min_us = l.min_ns as f64 / 1e3;
            serde_json::json!({"name": l.name, "kernel": l.kernel, "out": l.out, "us": us, "min_us": min_us,
                "binary_macs": l.binary_macs, "addsub_macs": l.addsub_macs, "float_macs": l.float_macs,
                "binary_gmacs_per_s": gops(l.binary_macs), "addsub_gmacs_per_s": gops(l.addsub_macs)})
        })
        .collect();
    if a.json {
        let mut o = serde_json::json!({"model": a.model.display().to_string(), "name": dm.graph.name,
            "precision": dm.graph.precision, "batch": batch, "threads": a.threads,
            "latency_us_median": med, "latency_us_p90": p90, "latency_us_min": min, "images_per_s": ips, "runs": times.len(),
            "kernel_path": sbdnet_kernels::kernel_path().name()});
        if a.profile {
            o["layers"] = serde_json::Value::Array(layers);
        }
        println!("{o}");
        return Ok(());
    }
    println!(
        "{} ({} {}), batch {batch}, {} thread(s): median {med:.1} us, p90 {p90:.1} us, min {min:.1} us, {ips:.0} images/s ({} runs)",
        a.model.display(),
        dm.graph.name,
        dm.graph.precision,
        a.threads,
        times.len()
    );
    if a.profile {
        println!(
            "{:<18} {:<18} {:>12} {:>9} {:>9} {:>12} {:>12}",
            "layer", "kernel", "output", "mean us", "min us", "binary GOP/s", "addsub GOP/s"
        );
        for l in &layers {
            let out = l["out"].as_array().map(|v| v.iter().map(|x| x.to_string()).collect::<Vec<_>>().join("x"));
            println!(
                "{:<18} {:<18} {:>12} {:>9.2} {:>9.2} {:>12.1} {:>12.1}",
                l["name"].as_str().unwrap_or(""),
                l["kernel"].as_str().unwrap_or(""),
                out.unwrap_or_default(),
                l["us"].as_f64().unwrap_or(0.0),
                l["min_us"].as_f64().unwrap_or(0.0),
                l["binary_gmacs_per_s"].as_f64().unwrap_or(0.0),
                l["addsub_gmacs_per_s"].as_f64().unwrap_or(0.0)
            );
        }
    }
    Ok(())
}

/// One row of the deployed summary: per image, as the plan executes it.
#[derive(serde::Serialize, Default, Clone)]
struct DeployedRow {
    name: String,
    kernel: String,
    output: [usize; 3],
    stored_bytes: usize,
    /// XNOR + popcount multiply-accumulates (binary weights on binary activations).
    binary_ops: u64,
    /// Additions and subtractions (8-bit add/sub MACs, or a lookup layer's table and
    /// accumulation additions; float adds, pooling sums).
    additions: u64,
    /// Table lookups (W1-A8 lookup layers: each stands for up to 5 add/sub MACs).
    lookups: u64,
    /// Multiplications (float MACs, per-channel affines, quantization scales).
    multiplications: u64,
}

/// `sbdnet summary model.sbd`.
pub fn deployed_summary(path: &std::path::Path, json: bool) -> Result<()> {
    use sbdnet_runtime::graph::{Op, Output};
    let dm = DeployedModel::load(path)?;
    let plan = Plan::new(&dm, 1, PlanOptions::default())?;
    let mut rows = Vec::new();
    for (i, (l, info)) in dm.graph.layers.iter().zip(&plan.info).enumerate() {
        let (x, y) = (dm.values[l.inputs[0]], dm.values[i + 1]);
        let prefix = format!("{}.", l.name);
        let stored_bytes =
            dm.tensors.iter().filter(|(k, _)| k.starts_with(&prefix)).map(|(_, t)| t.bytes()).sum::<usize>();
        let outs = y.len() as u64;
        let mut r = DeployedRow {
            name: l.name.clone(),
            kernel: info.kernel.to_string(),
            output: info.out,
            stored_bytes,
            binary_ops: info.binary_macs,
            ..Default::default()
        };
        match &l.op {
            Op::Conv(cv) => {
                // A lookup layer's MACs are lookups plus the additions it executes.
                let addsub = if info.lookups > 0 { info.lookup_adds } else { info.addsub_macs };
                r.additions = addsub + info.float_macs;
                r.lookups = info.lookups;
                r.multiplications = info.float_macs;
                if info.addsub_macs > 0 {
                    // quantize the input, scale the integer sums back
                    r.multiplications += x.len() as u64 + outs;
                }
                if !matches!(cv.output, Output::Threshold { .. }) {
                    r.multiplications += outs;
                    r.additions += outs;
                }
            }
            Op::Linear { inp, out, .. } => {
                r.multiplications = (inp * out) as u64;
                r.additions = (inp * out) as u64;
            }
            Op::Affine { .. } => {
                r.multiplications = outs;
                r.additions = outs;
            }
            Op::GlobalAvgPool | Op::Pool { max: false, .. } => {
                r.additions = x.len() as u64;
                r.multiplications = outs;
            }
            Op::Add => r.additions = outs,
            _ => {}
        }
        rows.push(r);
    }
    let mut total = DeployedRow { name: "total".into(), kernel: String::new(), ..Default::default() };
    for r in &rows {
        total.stored_bytes += r.stored_bytes;
        total.binary_ops += r.binary_ops;
        total.additions += r.additions;
        total.lookups += r.lookups;
        total.multiplications += r.multiplications;
    }
    if json {
        println!(
            "{}",
            serde_json::json!({"model": path.display().to_string(), "name": dm.graph.name,
                "precision": dm.graph.precision, "layers": rows, "total": total})
        );
        return Ok(());
    }
    println!("{} ({} {}), deployed plan per image", path.display(), dm.graph.name, dm.graph.precision);
    println!(
        "{:<16} {:<18} {:>12} {:>10} {:>12} {:>12} {:>12} {:>12}",
        "layer", "kernel", "output", "bytes", "xnor+pop", "add/sub", "lookups", "mults"
    );
    for r in rows.iter().chain(std::iter::once(&total)) {
        let out =
            if r.name == "total" { String::new() } else { format!("{}x{}x{}", r.output[0], r.output[1], r.output[2]) };
        println!(
            "{:<16} {:<18} {:>12} {:>10} {:>12} {:>12} {:>12} {:>12}",
            r.name, r.kernel, out, r.stored_bytes, r.binary_ops, r.additions, r.lookups, r.multiplications
        );
    }
    Ok(())
}

//! `sbdnet bench ...`: timings on random data.

use crate::cli::{BenchCommand, BenchTrainArgs};
use anyhow::{Context, Result};
use sbdnet_kernels::rng::Rng;
use sbdnet_nn::{Loss, Model, Optimizer, OptimizerConfig};
use std::time::Instant;

pub fn run(cmd: BenchCommand) -> Result<()> {
    match cmd {
        BenchCommand::Train(a) => bench_train(a),
        BenchCommand::Linear(a) => crate::bench_linear::run(a),
        BenchCommand::Model(a) => crate::infer::bench_model(a),
    }
}

pub fn summary(a: crate::cli::SummaryArgs) -> Result<()> {
    // A file, or a path that names a `.sbd` file (missing: the loader says so), is a deployed
    // model; anything else a training run directory.
    if let Some(path) = a.dir.as_ref().filter(|p| p.is_file() || p.extension().is_some_and(|e| e == "sbd")) {
        return crate::infer::deployed_summary(path, a.json);
    }
    let ck = a.dir.as_ref().map(|d| sbdnet_nn::checkpoint::Checkpoint::read(d)).transpose()?;
    let cfg = match &ck {
        Some(ck) => ck.config.clone(),
        None => {
            let default = match sbdnet_nn::ModelConfig::preferred_input_size(&a.m.model) {
                Some(s) => format!("{s}x{s}x1"),
                None => "28x28x1".to_string(),
            };
            a.m.config(parse_input(a.input.as_deref().unwrap_or(&default))?, a.classes)?
        }
    };
    let mut model = Model::new(cfg.clone(), 1, 0)?;
    if let (Some(ck), Some(dir)) = (&ck, &a.dir) {
        // The weights matter for sparse layers (their group masks).
        ck.apply(&mut model, None, &dir.join(sbdnet_nn::checkpoint::WEIGHTS_FILE))?;
    }
    if a.energy {
        return energy(&cfg, &model, a.json);
    }
    let s = sbdnet_nn::summary::summarize(&model);
    if a.json {
        let mut v = serde_json::to_value(&s)?;
        v["model"] = cfg.name.clone().into();
        v["precision"] = cfg.quant.precision.name().into();
        println!("{v}");
        return Ok(());
    }
    println!(
        "{} ({}), input {}x{}x{}, {} classes",
        cfg.name,
        cfg.quant.precision.name(),
        cfg.input[0],
        cfg.input[1],
        cfg.input[2],
        cfg.classes
    );
    let sparse = s.total.groups > 0;
    let extra = |a: String, b: String| if sparse { format!(" {a:>13} {b:>8}") } else { String::new() };
    println!(
        "{:<22} {:<26} {:>10} {:>9} {:>10} {:>11} {:>11} {:>11} {:>11}{}",
        "layer",
        "kind",
        "output",
        "params",
        "bits",
        "packed B",
        "MACs",
        "mults",
        "adds",
        extra("zero groups".into(), "sparsity".into())
    );
    for l in s.layers.iter().chain(std::iter::once(&s.total)) {
        if l.name == "total" {
            println!("{}", "-".repeat(if sparse { 153 } else { 130 }));
        }
        let groups = if l.groups > 0 {
            extra(format!("{}/{}", l.zero_groups, l.groups), format!("{:.1}%", 100.0 * l.sparsity))
        } else {
            extra(String::new(), String::new())
        };
        println!(
            "{:<22} {:<26} {:>10} {:>9} {:>10} {:>11} {:>11} {:>11} {:>11}{groups}",
            l.name,
            l.kind,
            l.output,
            l.params,
            l.param_bits,
            l.memory_packed_bytes,
            l.macs,
            l.multiplications,
            l.additions
        );
    }
    if sparse {
        println!(
            "group-sparse layers: {} of {} groups zero ({:.1}% of their weights); {} additions removed per image",
            s.total.zero_groups,
            s.total.groups,
            100.0 * s.total.sparsity,
            s.total.additions_removed
        );
    }
    println!(
        "parameters: {} ({:.1} KiB as float, {:.1} KiB deployed: {:.1}x smaller); per image: {} MACs, {} multiplications, {} additions{}",
        s.total.params,
        s.total.memory_float_bytes as f64 / 1024.0,
        s.total.memory_packed_bytes as f64 / 1024.0,
        s.compression,
        s.total.macs,
        s.total.multiplications,
        s.total.additions,
        if s.total.binary_ops > 0 { format!(" ({} as XNOR+popcount)", s.total.binary_ops) } else { String::new() }
    );
    Ok(())
}

pub(crate) fn parse_input(s: &str) -> Result<[usize; 3]> {
    let v: Vec<usize> = s
        .split('x')
        .map(|p| p.trim().parse::<usize>())
        .collect::<Result<_, _>>()
        .with_context(|| format!("--input {s}: expected HxWxC, e.g. 28x28x1"))?;
    anyhow::ensure!(v.len() == 3 && v.iter().all(|&d| d > 0), "--input {s}: expected three positive sizes HxWxC");
    Ok([v[0], v[1], v[2]])
}

/// Median of a sample (sorts it).
pub fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    if n == 0 {
        return f64::NAN;
    }
    if n % 2 == 1 {
        v[n / 2]
    } else {
        0.5 * (v[n / 2 - 1] + v[n / 2])
    }
}

fn bench_train(a: BenchTrainArgs) -> Result<()> {
    anyhow::ensure!(a.batch_size >= 1 && a.steps >= 1, "--batch-size and --steps must be at least 1");
    let input = parse_input(&a.input)?;
    let cfg = a.m.config(input, 10)?;
    let mut model = Model::new(cfg, a.batch_size, 0)?;
    let mut opt = Optimizer::new(OptimizerConfig::default(), model.params.len());
    let mut r = Rng::new(1);
    let il: usize = input.iter().product();
    let x: Vec<f32> = (0..a.batch_size * il).map(|_| r.normal()).collect();
    let y: Vec<u8> = (0..a.batch_size).map(|_| r.below(10) as u8).collect();
    let loss = Loss::default();
    for _ in 0..a.warmup {
        model.train_step(&x, &y, &loss)?;
        opt.step(&mut model.params, 0.01);
    }
    if a.profile {
        model.set_profiling(true);
    }
    let mut times = Vec::with_capacity(a.steps);
    for _ in 0..a.steps {
        let t0 = Instant::now();
        model.train_step(&x, &y, &loss)?;
        opt.step(&mut model.params, 0.01);
        times.push(t0.elapsed().as_secs_f64() * 1e3);
    }
    let (min, max) = times.iter().fold((f64::INFINITY, 0.0f64), |(lo, hi), &t| (lo.min(t), hi.max(t)));
    let med = median(&mut times);
    let ips = a.batch_size as f64 / med * 1e3;
    let layers: Vec<serde_json::Value> = model
        .profile
        .as_ref()
        .map(|p| {
            model
                .nodes
                .iter()
                .enumerate()
                .map(|(i, n)| {
                    serde_json::json!({
                        "name": n.name, "kind": n.op.kind(), "out": n.out_shape.to_string(),
                        "forward_ms": p.forward_ns[i] as f64 / 1e6 / p.steps.max(1) as f64,
                        "backward_ms": p.backward_ns[i] as f64 / 1e6 / p.steps.max(1) as f64,
                    })
                })
                .collect()
        })
        .unwrap_or_default();
    if a.json {
        let mut v = serde_json::json!({
            "model": a.m.model, "precision": a.m.precision, "width": a.m.width, "batch_size": a.batch_size, "threads": rayon::current_num_threads(), "input": a.input,
            "steps": a.steps, "step_ms_median": med, "step_ms_min": min, "step_ms_max": max, "images_per_s": ips,
            "kernels": sbdnet_kernels::kernel_path().name(),
        });
        if a.profile {
            v["layers"] = serde_json::Value::Array(layers);
        }
        println!("{v}");
    } else {
        println!(
            "{} {} train step, batch {} of {}, {} threads ({} kernels): median {med:.2} ms (min {min:.2}, max {max:.2}) -> {ips:.0} images/s",
            a.m.model,
            a.m.precision,
            a.batch_size,
            a.input,
            rayon::current_num_threads(),
            sbdnet_kernels::kernel_path().name()
        );
        if a.profile {
            println!("{:<18} {:<9} {:>10} {:>10} {:>10}", "layer", "kind", "out", "fwd ms", "bwd ms");
            for l in &layers {
                println!(
                    "{:<18} {:<9} {:>10} {:>10.3} {:>10.3}",
                    l["name"].as_str().unwrap_or(""),
                    l["kind"].as_str().unwrap_or(""),
                    l["out"].as_str().unwrap_or(""),
                    l["forward_ms"].as_f64().unwrap_or(0.0),
                    l["backward_ms"].as_f64().unwrap_or(0.0)
                );
            }
        }
    }
    Ok(())
}

/// Energy per operation and per access, picojoules (45 nm; docs/ENERGY.md gives the sources
/// and the assumptions).
mod pj {
    pub const F32_MULT: f64 = 3.7;
    pub const F32_ADD: f64 = 0.9;
    /// One binary multiply-accumulate: a 64-bit XNOR + popcount + 32-bit accumulate, taken as
    /// two 32-bit integer additions (0.1 pJ each) per 64 MACs.
    pub const BINARY_MAC: f64 = 0.2 / 64.0;
    /// DRAM access per 32 bits (weights are fetched once per inference).
    pub const DRAM_32: f64 = 640.0;
}

#[derive(serde::Serialize)]
struct EnergyRow {
    precision: String,
    scope: &'static str,
    compute_pj: f64,
    memory_pj: f64,
    multiplications: usize,
    additions: usize,
    binary_ops: usize,
    param_bits: usize,
}

fn energy_of(layers: &[&sbdnet_nn::summary::LayerSummary], precision: &str, scope: &'static str) -> EnergyRow {
    let (mut mults, mut adds, mut bops, mut bits) = (0, 0, 0, 0);
    for l in layers {
        mults += l.multiplications;
        adds += l.additions - l.binary_ops;
        bops += l.binary_ops;
        bits += l.param_bits;
    }
    let compute = mults as f64 * pj::F32_MULT + adds as f64 * pj::F32_ADD + bops as f64 * pj::BINARY_MAC;
    let memory = bits as f64 / 32.0 * pj::DRAM_32;
    EnergyRow {
        precision: precision.to_string(),
        scope,
        compute_pj: compute,
        memory_pj: memory,
        multiplications: mults,
        additions: adds,
        binary_ops: bops,
        param_bits: bits,
    }
}

/// `sbdnet summary --energy`: the model at float (the baseline), w1, w1a1 and its own
/// precision, whole network and pointwise convolutions only.
fn energy(cfg: &sbdnet_nn::ModelConfig, own_model: &Model, json: bool) -> Result<()> {
    let mut precisions = vec!["float".to_string(), "w1".to_string(), "w1a1".to_string()];
    let own = cfg.quant.precision.name().to_string();
    if !precisions.contains(&own) {
        precisions.push(own.clone());
    }
    let mut rows = Vec::new();
    for p in &precisions {
        // The model's own precision with its weights (a sparse checkpoint's zero groups);
        // the others from the architecture.
        let s = if *p == own {
            sbdnet_nn::summary::summarize(own_model)
        } else {
            let mut c = cfg.clone();
            c.quant.precision = p.parse().map_err(anyhow::Error::msg)?;
            sbdnet_nn::summary::summarize(&Model::new(c, 1, 0)?)
        };
        let all: Vec<_> = s.layers.iter().collect();
        let pw: Vec<_> = s.layers.iter().filter(|l| l.kind.starts_with("conv-pw")).collect();
        rows.push(energy_of(&all, p, "network"));
        rows.push(energy_of(&pw, p, "pointwise convs"));
    }
    let base = |scope: &str| {
        rows.iter().find(|r| r.precision == "float" && r.scope == scope).map(|r| (r.compute_pj, r.memory_pj))
    };
    if json {
        println!("{}", serde_json::json!({"model": cfg.name, "rows": rows}));
        return Ok(());
    }
    println!("{} energy per image (pJ; table and assumptions in docs/ENERGY.md)", cfg.name);
    println!(
        "{:<10} {:<16} {:>14} {:>9} {:>14} {:>9}",
        "precision", "scope", "compute", "saved", "weight fetch", "saved"
    );
    for r in &rows {
        let (bc, bm) = base(r.scope).unwrap_or((r.compute_pj, r.memory_pj));
        println!(
            "{:<10} {:<16} {:>14.0} {:>8.1}% {:>14.0} {:>8.1}%",
            r.precision,
            r.scope,
            r.compute_pj,
            100.0 * (1.0 - r.compute_pj / bc),
            r.memory_pj,
            100.0 * (1.0 - r.memory_pj / bm)
        );
    }
    Ok(())
}

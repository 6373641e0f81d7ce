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
    }
}

pub fn summary(a: crate::cli::SummaryArgs) -> Result<()> {
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

fn parse_input(s: &str) -> Result<[usize; 3]> {
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

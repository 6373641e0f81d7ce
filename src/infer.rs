//! `sbdnet export` and `sbdnet infer`: deployed models.

use crate::cli::{ExportArgs, ExportFormat, InferArgs};
use crate::train::{argmax, data_dir, load_run, load_split, pad_split, predictions, prepare, LoadedRun};
use anyhow::{bail, Context, Result};
use sbdnet_runtime::DeployedModel;
use std::time::Instant;

pub fn export(a: ExportArgs) -> Result<()> {
    let LoadedRun { model, mean, std, .. } = load_run(&a.dir, a.dataset.as_deref(), &a.data.data_dir, a.bn_recalibrate)
        .with_context(|| format!("cannot load the checkpoint in {}", a.dir.display()))?;
    if a.format == ExportFormat::Onnx {
        bail!("--format onnx is not available yet");
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
    let batch = a.batch.max(1);
    let t0 = Instant::now();
    let mut preds = Vec::with_capacity(n);
    for (x, chunk) in test.x.chunks(batch * test.il).zip(test.y.chunks(batch)) {
        let b = chunk.len();
        let logits = sbdnet_runtime::reference::run(&dm, x, b)?;
        preds.extend(logits.chunks_exact(dm.graph.classes).map(argmax));
    }
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

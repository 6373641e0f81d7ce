//! End-to-end tests of the `sbdnet` binary on the embedded digits data.

use std::path::Path;
mod common;

use common::{json, sbdnet, tmp};

#[test]
fn dscnn_learns_digits_and_eval_agrees() {
    let dir = tmp("learn");
    let d = dir.to_str().unwrap();
    let v = json(&sbdnet(&["train", "--epochs", "12", "--batch-size", "64", "--threads", "2", "--out", d, "--json"]));
    let acc = v["test_accuracy"].as_f64().unwrap();
    assert!(acc > 0.85, "dscnn on digits reached only {acc}");
    let lines = std::fs::read_to_string(dir.join("metrics.jsonl")).unwrap();
    assert_eq!(lines.lines().count(), 12);
    for key in ["epoch", "train_loss", "train_acc", "test_loss", "test_acc", "images_per_s", "seconds"] {
        assert!(
            lines.lines().all(|l| serde_json::from_str::<serde_json::Value>(l).unwrap().get(key).is_some()),
            "{key}"
        );
    }
    let e = json(&sbdnet(&["eval", d, "--json", "--threads", "2"]));
    assert!((e["accuracy"].as_f64().unwrap() - acc).abs() < 1e-6, "eval {e} vs train {acc}");
}

fn tensors(dir: &Path) -> Vec<(String, Vec<f32>)> {
    let ck = sbdnet_nn::checkpoint::Checkpoint::read(dir).unwrap();
    let mut v: Vec<_> = ck.tensors.into_iter().map(|(k, (_, d))| (k, d)).collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

#[test]
fn resume_gives_bit_identical_weights() {
    let (a, b) = (tmp("straight"), tmp("resumed"));
    let common = ["train", "--epochs", "4", "--batch-size", "64", "--threads", "2", "--quiet", "--seed", "3"];
    let mut straight = common.to_vec();
    straight.extend(["--out", a.to_str().unwrap()]);
    assert!(sbdnet(&straight).status.success());
    let mut first = common.to_vec();
    first.extend(["--out", b.to_str().unwrap(), "--stop-after", "2"]);
    assert!(sbdnet(&first).status.success());
    let out = sbdnet(&["train", "--resume", b.to_str().unwrap(), "--quiet", "--threads", "2"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let (ta, tb) = (tensors(&a), tensors(&b));
    assert!(!ta.is_empty());
    assert_eq!(ta, tb, "resumed run differs from the uninterrupted one");
    assert_eq!(std::fs::read_to_string(b.join("metrics.jsonl")).unwrap().lines().count(), 4);
}

#[test]
fn divergence_stops_with_a_clear_message_and_keeps_the_checkpoint() {
    let dir = tmp("diverge");
    let d = dir.to_str().unwrap();
    // One good epoch at a sane rate, then resume is not involved: a huge rate from the start
    // must diverge within the first epoch with no checkpoint.
    let out = sbdnet(&["train", "--epochs", "2", "--lr", "1e12", "--warmup-epochs", "0", "--out", d, "--quiet"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("diverged") && err.contains("--lr"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
}

#[test]
fn missing_dataset_says_how_to_fetch() {
    let empty = tmp("nodata");
    std::fs::create_dir_all(&empty).unwrap();
    let out = sbdnet(&["train", "--dataset", "mnist", "--data-dir", empty.to_str().unwrap(), "--quiet"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("sbdnet data fetch mnist"), "{err}");
}

#[test]
fn corrupt_checkpoint_is_an_error_not_a_panic() {
    let dir = tmp("corrupt");
    let d = dir.to_str().unwrap();
    assert!(sbdnet(&["train", "--epochs", "1", "--out", d, "--quiet"]).status.success());
    let w = dir.join("model.safetensors");
    let bytes = std::fs::read(&w).unwrap();
    // One flipped bit in the last weight: the data checksum refuses it.
    let mut flipped = bytes.clone();
    *flipped.last_mut().unwrap() ^= 0x20;
    std::fs::write(&w, &flipped).unwrap();
    for args in [vec!["eval", d], vec!["train", "--resume", d], vec!["export", d, "-o", "/dev/null"]] {
        let out = sbdnet(&args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && err.contains("checksum") && !err.contains("panicked"), "{err}");
    }
    // Truncated.
    std::fs::write(&w, &bytes[..bytes.len() / 2]).unwrap();
    for args in [vec!["eval", d], vec!["train", "--resume", d]] {
        let out = sbdnet(&args);
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("model.safetensors") && !err.contains("panicked"), "{err}");
    }
    // Edited metadata (outside the data checksum): a normalization that does not fit the
    // data (two deviations for one channel, one of them 0), and training state that is not JSON.
    let header = |bytes: &[u8], edit: &dyn Fn(&str) -> String| {
        let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
        let h = edit(std::str::from_utf8(&bytes[8..8 + n]).unwrap());
        let mut out = (h.len() as u64).to_le_bytes().to_vec();
        out.extend_from_slice(h.as_bytes());
        out.extend_from_slice(&bytes[8 + n..]);
        out
    };
    let std_key = "std\\\":[";
    let edited = header(&bytes, &|h| {
        assert!(h.contains(std_key), "{h}");
        h.replacen(std_key, &format!("{std_key}0.0,"), 1)
    });
    std::fs::write(&w, &edited).unwrap();
    for args in [vec!["eval", d], vec!["train", "--resume", d]] {
        let out = sbdnet(&args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && err.contains("damaged normalization") && !err.contains("panicked"), "{err}");
    }
    std::fs::write(&w, header(&bytes, &|h| h.replacen("model_step\\\":", "model_step\\\":{", 1))).unwrap();
    let out = sbdnet(&["eval", d]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("not valid JSON") && !err.contains("panicked"), "{err}");
    let out = sbdnet(&["eval", "/nonexistent/dir"]);
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("sbdnet train"));
}

#[test]
fn models_of_linear_layers_refuse_binary_precisions_they_would_ignore() {
    for p in ["w1", "w1a1", "sw1"] {
        let out = sbdnet(&["train", "--model", "mlp", "--precision", p, "--epochs", "1", "--out", "/dev/null"]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && err.contains("stay float") && !err.contains("panicked"), "{p}: {err}");
    }
}

#[test]
fn bench_train_json_has_the_documented_keys() {
    let v = json(&sbdnet(&[
        "bench",
        "train",
        "--batch-size",
        "8",
        "--input",
        "12x12x1",
        "--steps",
        "3",
        "--warmup",
        "1",
        "--threads",
        "1",
        "--json",
    ]));
    assert!(v["step_ms_median"].as_f64().unwrap() > 0.0);
    assert!(v["images_per_s"].as_f64().unwrap() > 0.0);
}

#[test]
fn demo_trains_float_and_binary_weights_well_above_chance() {
    let dir = tmp("demo");
    let v = json(&sbdnet(&["demo", "--epochs", "12", "--threads", "2", "--json", "--out", dir.to_str().unwrap()]));
    let runs = v["runs"].as_array().unwrap();
    assert_eq!(runs.len(), 3);
    for r in runs {
        let acc = r["test_accuracy"].as_f64().unwrap();
        assert!(acc > 0.8, "{} reached only {acc}", r["precision"]);
    }
    assert_eq!(runs[1]["precision"], "w1");
    assert_eq!(runs[2]["precision"], "sw1");
    assert!((runs[2]["sparsity"].as_f64().unwrap() - 0.7).abs() < 0.01, "{}", runs[2]);
    // The deployed weights of every binarized layer of the saved w1 model take only +alpha
    // and -alpha (one alpha per layer by default).
    let ck = sbdnet_nn::checkpoint::Checkpoint::read(&dir.join("dscnn-w1")).unwrap();
    let mut model = sbdnet_nn::Model::new(ck.config.clone(), 2, 0).unwrap();
    ck.apply(&mut model, None, &dir).unwrap();
    let x = vec![0.0f32; 2 * 64];
    model.forward(&x, 2, false).unwrap();
    let mut binarized = 0;
    for node in &model.nodes {
        if let sbdnet_nn::model::Op::Conv(c) = &node.op {
            if let Some(b) = &c.bin {
                binarized += 1;
                let a = b.alpha[0];
                assert!(a > 0.0);
                assert!(b.wb.iter().all(|&w| w == a || w == -a), "{}: values other than +-{a}", node.name);
                // And they are the signs of the saved latent weights.
                let latent = model.params.get(&format!("{}.weight", node.name)).unwrap();
                assert!(latent.iter().zip(&b.wb).all(|(&l, &w)| (l >= 0.0) == (w > 0.0)));
            }
        }
    }
    assert_eq!(binarized, 8, "dscnn has 8 binarized convolutions (4 depthwise, 4 pointwise)");
}

#[test]
fn summary_counts_no_multiplications_in_binarized_layers() {
    let v = json(&sbdnet(&["summary", "--model", "dscnn", "--precision", "w1", "--json"]));
    let layers = v["layers"].as_array().unwrap();
    for l in layers.iter().filter(|l| l["kind"].as_str().unwrap().ends_with("/w1")) {
        assert_eq!(l["multiplications"], 0, "{l}");
        assert_eq!(l["additions"], l["macs"], "{l}");
    }
    let total_macs: u64 = layers.iter().map(|l| l["macs"].as_u64().unwrap()).sum();
    assert_eq!(v["total"]["macs"].as_u64().unwrap(), total_macs);
    let f = json(&sbdnet(&["summary", "--model", "dscnn", "--json"]));
    assert_eq!(f["total"]["params"], v["total"]["params"]);
    assert!(v["compression"].as_f64().unwrap() > 8.0, "{}", v["compression"]);
    assert!((f["compression"].as_f64().unwrap() - 1.0).abs() < 1e-9);
}

#[test]
fn w1a1_with_shortcuts_starts_from_a_float_run_and_learns() {
    let (f, b) = (tmp("init-float"), tmp("init-w1a1"));
    let (fs, bs) = (f.to_str().unwrap(), b.to_str().unwrap());
    assert!(sbdnet(&["train", "--epochs", "3", "--threads", "2", "--quiet", "--out", fs]).status.success());
    let args = ["train", "--precision", "w1a1", "--shortcut", "--lr", "1.0", "--epochs", "8", "--threads", "2"];
    let mut a = args.to_vec();
    a.extend(["--init", fs, "--json", "--out", bs]);
    let v = json(&sbdnet(&a));
    let acc = v["test_accuracy"].as_f64().unwrap();
    assert!(acc > 0.5, "w1a1 with shortcuts from a float start reached only {acc}");
    let cfg: serde_json::Value = serde_json::from_slice(&std::fs::read(b.join("config.json")).unwrap()).unwrap();
    assert_eq!(cfg["quant"]["real_shortcut"], true);
    // A missing --init directory is an error that names the option, not a panic.
    let mut a = args.to_vec();
    a.extend(["--init", "/nonexistent/sbdnet-run", "--quiet", "--out", bs]);
    let out = sbdnet(&a);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--init") && !err.contains("panicked"), "{err}");

    // Distillation from the same (3-epoch, so weak) float run: a w1 student learns well above
    // chance (10%); bad options are errors that name them.
    let d = tmp("distill-w1");
    let ds = d.to_str().unwrap();
    let base = ["train", "--precision", "w1", "--epochs", "6", "--threads", "2", "--out", ds];
    let mut a = base.to_vec();
    a.extend(["--distill", fs, "--json"]);
    let v = json(&sbdnet(&a));
    let acc = v["test_accuracy"].as_f64().unwrap();
    assert!(acc > 0.5, "w1 distilled from the float run reached only {acc}");
    for (extra, named) in [
        (["--distill", "/nonexistent/sbdnet-run", "--quiet"], "--distill"),
        (["--distill", fs, "--distill-weight=1.5"], "--distill-weight"),
        (["--distill", fs, "--distill-temperature=0"], "--distill-temperature"),
    ] {
        let mut a = base.to_vec();
        a.extend(extra);
        let out = sbdnet(&a);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && err.contains(named) && !err.contains("panicked"), "{extra:?}: {err}");
    }
}

#[test]
fn sw1_learns_digits_with_the_requested_group_sparsity() {
    let dir = tmp("sw1");
    let d = dir.to_str().unwrap();
    let args = ["train", "--precision", "sw1", "--target-sparsity", "0.6", "--group-size", "8", "--epochs", "12"];
    let mut args = args.to_vec();
    args.extend(["--batch-size", "64", "--prune-every", "10", "--threads", "2", "--out", d, "--json"]);
    let v = json(&sbdnet(&args));
    let acc = v["test_accuracy"].as_f64().unwrap();
    assert!(acc > 0.8, "dscnn sw1 on digits reached only {acc}");
    let sp = v["sparsity"].as_f64().unwrap();
    assert!((sp - 0.6).abs() < 0.01, "group sparsity {sp}, asked for 0.6");
    // Per epoch: sparsity rises on the cubic schedule and is frozen for the last 3 (fine-tune).
    let lines = std::fs::read_to_string(dir.join("metrics.jsonl")).unwrap();
    let sps: Vec<f64> = lines
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["sparsity"].as_f64().unwrap())
        .collect();
    assert!(sps.windows(2).all(|w| w[0] <= w[1]) && sps[0] < 0.3 && sps[8..].iter().all(|&s| s == sp), "{sps:?}");
    let e = json(&sbdnet(&["eval", d, "--json", "--threads", "2"]));
    assert!((e["accuracy"].as_f64().unwrap() - acc).abs() < 1e-6, "eval {e} vs train {acc}");
    // The summary of the checkpoint: per-layer and total sparsity and zero groups.
    let s = json(&sbdnet(&["summary", d, "--json"]));
    assert!((s["total"]["sparsity"].as_f64().unwrap() - sp).abs() < 1e-9, "{}", s["total"]);
    assert_eq!(s["total"]["zero_groups"], v["zero_groups"]);
    let layers = s["layers"].as_array().unwrap();
    let pw: Vec<_> = layers.iter().filter(|l| l["kind"] == "conv-pw/sw1").collect();
    assert_eq!(pw.len(), 4);
    for l in &pw {
        let (macs, adds, removed) = (l["macs"].as_u64(), l["additions"].as_u64(), l["additions_removed"].as_u64());
        assert!(l["sparsity"].as_f64().unwrap() > 0.6 && l["zero_groups"].as_u64().unwrap() > 0, "{l}");
        assert_eq!(adds.unwrap() + removed.unwrap(), macs.unwrap(), "{l}");
        assert!(l["param_bits"].as_u64().unwrap() < l["params"].as_u64().unwrap(), "packed sparse form: {l}");
    }
    // Pruned groups are exactly zero in the saved latent weights.
    let ck = sbdnet_nn::checkpoint::Checkpoint::read(&dir).unwrap();
    let mut model = sbdnet_nn::Model::new(ck.config.clone(), 2, 0).unwrap();
    ck.apply(&mut model, None, &dir).unwrap();
    let mut zero = 0;
    for node in &model.nodes {
        let sbdnet_nn::model::Op::Conv(c) = &node.op else { continue };
        let Some(g) = c.bin.as_ref().and_then(|b| b.groups) else { continue };
        let w = &model.params.data[c.weight.range()];
        for (r, &m) in g.layout.ranges().zip(&model.params.buffers[g.mask.range()]) {
            if m == 0.0 {
                zero += 1;
                assert!(w[r].iter().all(|&x| x == 0.0), "{}: a pruned group is not zero", node.name);
            }
        }
    }
    assert_eq!(Some(zero), v["zero_groups"].as_u64());
}

#[test]
fn sw1_with_lasso_fade_learns_digits_and_saves_an_unfaded_model() {
    let dir = tmp("sw1-fade");
    let d = dir.to_str().unwrap();
    let args = ["train", "--precision", "sw1", "--target-sparsity", "0.5", "--lasso-fade", "--lasso-lambda", "0.02"];
    let mut args = args.to_vec();
    args.extend(["--epochs", "8", "--batch-size", "64", "--prune-every", "10", "--threads", "2", "--out", d, "--json"]);
    let v = json(&sbdnet(&args));
    let acc = v["test_accuracy"].as_f64().unwrap();
    assert!(acc > 0.7, "dscnn sw1 with --lasso-fade on digits reached only {acc}");
    assert!((v["sparsity"].as_f64().unwrap() - 0.5).abs() < 0.01, "{v}");
    // The checkpoint is the deployed model: evaluating it gives the run's last accuracy.
    let e = json(&sbdnet(&["eval", d, "--json", "--threads", "2"]));
    assert!((e["accuracy"].as_f64().unwrap() - acc).abs() < 1e-6, "eval {e} vs train {acc}");
}

#[test]
fn sparse_options_are_checked() {
    let cases: [(&[&str], &str); 7] = [
        (&["--precision", "sw1", "--target-sparsity", "0.99", "--finetune-epochs", "0"], "every pointwise layer"),
        (&["--precision", "sw1", "--prune", "magnitude", "--lasso-fade"], "--lasso-fade"),
        (&["--precision", "sw1", "--lasso-lambda", "0", "--lasso-fade"], "--lasso-fade"),
        (&["--precision", "w1", "--target-sparsity", "0.5"], "sw1"),
        (&["--precision", "sw1", "--target-sparsity", "1.5"], "--target-sparsity"),
        (&["--precision", "sw1", "--finetune-epochs", "1"], "--finetune-epochs"),
        (&["--precision", "sw1", "--group-size", "0"], "--group-size"),
    ];
    for (extra, needle) in cases {
        let mut args = vec!["train", "--epochs", "1", "--quiet", "--out"];
        let dir = tmp("sparse-bad");
        args.push(dir.to_str().unwrap());
        args.extend(extra);
        let out = sbdnet(&args);
        assert!(!out.status.success(), "{extra:?} was accepted");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(needle) && !err.contains("panicked"), "{extra:?}: {err}");
    }
}

#[test]
fn sw1_resume_gives_bit_identical_weights_and_masks() {
    let (a, b) = (tmp("sw1-straight"), tmp("sw1-resumed"));
    let common = ["train", "--precision", "sw1", "--epochs", "4", "--batch-size", "64", "--prune-every", "7"];
    let mut straight = common.to_vec();
    straight.extend(["--threads", "1", "--quiet", "--out", a.to_str().unwrap()]);
    assert!(sbdnet(&straight).status.success());
    let mut first = common.to_vec();
    first.extend(["--threads", "1", "--quiet", "--out", b.to_str().unwrap(), "--stop-after", "2"]);
    assert!(sbdnet(&first).status.success());
    let out = sbdnet(&["train", "--resume", b.to_str().unwrap(), "--quiet", "--threads", "1"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let (ta, tb) = (tensors(&a), tensors(&b));
    assert_eq!(ta.iter().filter(|(k, _)| k.ends_with(".group_mask")).count(), 8);
    assert_eq!(ta, tb, "resumed sw1 run differs from the uninterrupted one");
}

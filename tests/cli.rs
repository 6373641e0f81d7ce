//! End-to-end tests of the `sbdnet` binary on the embedded digits data.

use std::path::Path;
use std::process::{Command, Output};

fn sbdnet(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_sbdnet")).args(args).output().expect("the binary runs")
}

fn json(out: &Output) -> serde_json::Value {
    assert!(out.status.success(), "failed: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&out.stdout)))
}

fn tmp(name: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("sbdnet-test-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

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
    std::fs::write(&w, &bytes[..bytes.len() / 2]).unwrap();
    for args in [vec!["eval", d], vec!["train", "--resume", d]] {
        let out = sbdnet(&args);
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("model.safetensors") && !err.contains("panicked"), "{err}");
    }
    let out = sbdnet(&["eval", "/nonexistent/dir"]);
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("sbdnet train"));
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

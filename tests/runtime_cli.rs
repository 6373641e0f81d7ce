//! End to end: train on the built-in digits, export to `.sbd` and ONNX, run the deployed model
//! (`infer`, `bench model`, `summary`), and refuse damaged files with a clear error.

mod common;
use common::{json, sbdnet, tmp};

fn train(precision: &str, dir: &std::path::Path) {
    let d = dir.to_str().unwrap();
    let mut args = vec!["train", "--precision", precision, "--epochs", "3", "--threads", "2", "--out", d, "--json"];
    if precision.starts_with("sw") {
        args.extend(["--target-sparsity", "0.5"]);
    }
    let out = sbdnet(&args);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

#[test]
fn exported_models_agree_with_training_and_bench_reports_latency() {
    for precision in ["w1a1", "w1", "float", "sw1a1", "sw1"] {
        let dir = tmp(&format!("rt-{precision}"));
        train(precision, &dir);
        let d = dir.to_str().unwrap();
        let sbd = dir.join("model.sbd");
        let f = sbd.to_str().unwrap();
        json(&sbdnet(&["export", d, "-o", f, "--json"]));
        // Float arithmetic in the W1 layers (--a8 float) and bit-exact W1A1: every prediction agrees.
        let v = json(&sbdnet(&["infer", f, "--dataset", "digits", "--agree-with", d, "--a8", "float", "--json"]));
        assert_eq!(v["agreement"].as_f64(), Some(1.0), "{precision}: {v}");
        assert!(v["accuracy"].as_f64().unwrap() > 0.1, "{precision}: {v}");
        if precision == "w1" || precision == "sw1" {
            // The default W1-A8 path (8-bit activations, additions only) differs from training
            // only by the activation rounding: nearly every prediction agrees (sw1: 76% with
            // one scale per tensor for the depthwise inputs, 96% with one per channel).
            let q = json(&sbdnet(&["infer", f, "--dataset", "digits", "--agree-with", d, "--json"]));
            assert!(q["agreement"].as_f64().unwrap() >= 0.9, "{q}");
        }
        // The reference executor gives the same accuracy.
        let r = json(&sbdnet(&["infer", f, "--dataset", "digits", "--reference", "--a8", "float", "--json"]));
        assert_eq!(r["accuracy"], v["accuracy"], "{precision}");
        let b = json(&sbdnet(&[
            "bench",
            "model",
            f,
            "--iters",
            "20",
            "--seconds",
            "0",
            "--warmup",
            "2",
            "--json",
            "--profile",
        ]));
        for key in ["latency_us_median", "latency_us_p90", "images_per_s"] {
            assert!(b[key].as_f64().unwrap() > 0.0, "{key}: {b}");
        }
        let s = json(&sbdnet(&["summary", f, "--json"]));
        for l in s["layers"].as_array().unwrap() {
            // Binary layers on binary inputs execute no multiplication inside the convolution.
            if l["kernel"].as_str().unwrap().starts_with("b") && precision == "w1a1" {
                assert!(l["binary_ops"].as_u64().unwrap() > 0, "{l}");
            }
        }
        if precision.ends_with("w1a1") {
            assert!(s["total"]["binary_ops"].as_u64().unwrap() > 0);
        }
        for l in s["layers"].as_array().unwrap() {
            // W1-A8 lookup layers (AVX-512 machines): lookups, and fewer additions than their
            // multiply-accumulates (each lookup stands for up to 5 of them).
            if l["kernel"] == "conv-w1a8-lookup" {
                let (lk, adds) = (l["lookups"].as_u64().unwrap(), l["additions"].as_u64().unwrap());
                assert!(lk > 0 && adds < 5 * lk, "{l}");
            } else {
                assert_eq!(l["lookups"].as_u64(), Some(0), "{l}");
            }
        }
        if precision == "sw1a1" {
            // Zero groups are skipped: fewer binary operations than the dense layers' MACs.
            let pw: Vec<_> =
                s["layers"].as_array().unwrap().iter().filter(|l| l["kernel"] == "bpw-sparse-xnor").collect();
            assert!(!pw.is_empty(), "{s}");
        }
        let onnx = dir.join("model.onnx");
        json(&sbdnet(&["export", d, "--format", "onnx", "-o", onnx.to_str().unwrap(), "--json"]));
        let bytes = std::fs::read(&onnx).unwrap();
        assert!(bytes.len() > 1000 && bytes.windows(4).any(|w| w == b"Conv"));
    }
}

#[test]
fn damaged_or_wrong_files_are_clear_errors() {
    let dir = tmp("rt-bad");
    std::fs::create_dir_all(&dir).unwrap();
    let f = dir.join("bad.sbd");
    std::fs::write(&f, b"not a model at all").unwrap();
    for args in [vec!["infer", f.to_str().unwrap(), "--dataset", "digits"], vec!["bench", "model", f.to_str().unwrap()]]
    {
        let out = sbdnet(&args);
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("not a valid sbdnet model file") && !err.contains("panicked"), "{err}");
    }
    let missing = dir.join("missing.sbd");
    let out = sbdnet(&["infer", missing.to_str().unwrap(), "--dataset", "digits"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("missing.sbd"), "{err}");
    // The cause once, not repeated by the error chain.
    assert_eq!(err.matches("os error").count(), 1, "{err}");
    // A directory that is not a training run, and a batch of 0, are named as such.
    let out = sbdnet(&["eval", dir.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("not a training run directory"), "{err}");
    for flag in ["--batch", "--iters"] {
        let out = sbdnet(&["bench", "model", f.to_str().unwrap(), flag, "0"]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && err.contains("at least 1") && !err.contains("panicked"), "{err}");
    }
    let out = sbdnet(&["infer", f.to_str().unwrap(), "--dataset", "digits", "--limit", "0"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("at least 1"), "{err}");
    // A model for other inputs is refused for a data set it does not fit (3 channels vs 1).
    let m = dir.join("rgb.sbd");
    let args = ["export", "--model", "dscnn", "--precision", "w1a1", "--input", "12x12x3", "-o", m.to_str().unwrap()];
    assert!(sbdnet(&args).status.success());
    let out = sbdnet(&["infer", m.to_str().unwrap(), "--dataset", "digits"]);
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("12x12x3"));
    // A batch whose buffers could not be allocated is refused before allocating.
    let out = sbdnet(&["bench", "model", m.to_str().unwrap(), "--batch", "100000000000"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("smaller batch") && !err.contains("panicked"), "{err}");
    let args =
        ["bench", "linear", "--kind", "diag", "--out-features", "64", "--in-features", "64", "--sparsity", "0.5"];
    let out = sbdnet(&[&args[..], &["--batch", "100000000000"]].concat());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("smaller batch") && !err.contains("panicked"), "{err}");
    // Flipped bits in the packed weights are refused (data checksum), by every command.
    let mut bytes = std::fs::read(&m).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0x10;
    let c = dir.join("corrupt.sbd");
    std::fs::write(&c, &bytes).unwrap();
    for args in [vec!["infer", c.to_str().unwrap(), "--dataset", "digits"], vec!["summary", c.to_str().unwrap()]] {
        let out = sbdnet(&args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && err.contains("corrupted") && !err.contains("panicked"), "{err}");
    }
    // A missing .sbd file is named as a missing file, not as a training run.
    let out = sbdnet(&["summary", missing.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("missing.sbd") && err.contains("os error"), "{err}");
}

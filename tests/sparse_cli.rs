//! End-to-end tests of `sbdnet train --model mlp --linear ...` on the embedded digits data.

mod common;

use common::{json, sbdnet, tmp};

#[test]
fn mlp_diag_learns_digits_and_logs_nnz() {
    let dir = tmp("diag");
    let d = dir.to_str().unwrap();
    let args = ["train", "--model", "mlp", "--linear", "diag", "--sparsity", "0.9", "--epochs", "20"];
    let mut args = args.to_vec();
    args.extend(["--batch-size", "32", "--update-every", "20", "--threads", "1", "--out", d, "--json"]);
    let v = json(&sbdnet(&args));
    let acc = v["test_accuracy"].as_f64().unwrap();
    assert!(acc > 0.8, "mlp diag on digits reached only {acc}");
    // 64 -> 256: K = ceil(0.1 * 256) = 26 diagonals of 64; 256 -> 256: 26 of 256.
    let budget = 26 * 64 + 26 * 256;
    assert_eq!(v["nnz"].as_u64(), Some(budget));
    let lines = std::fs::read_to_string(dir.join("metrics.jsonl")).unwrap();
    let nnz: Vec<u64> =
        lines.lines().map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["nnz"].as_u64().unwrap()).collect();
    assert_eq!(nnz.len(), 20);
    // Soft phase (30% of training) on 2K candidates, then exactly K diagonals.
    assert!(nnz[..5].iter().all(|&z| z == 2 * budget), "{nnz:?}");
    assert!(nnz[6..].iter().all(|&z| z == budget), "{nnz:?}");
    // The checkpoint evaluates to the same accuracy (offsets restored).
    let e = json(&sbdnet(&["eval", d, "--json", "--threads", "1"]));
    assert!((e["accuracy"].as_f64().unwrap() - acc).abs() < 1e-6, "eval {e} vs train {acc}");
    let s = json(&sbdnet(&["summary", d, "--json"]));
    let fc1 = s["layers"].as_array().unwrap().iter().find(|l| l["name"] == "fc1").unwrap();
    assert_eq!(fc1["kind"], "linear-diag");
    assert_eq!(fc1["params"].as_u64(), Some(26 * 64 + 256));
}

#[test]
fn sparse_kinds_keep_the_budget_and_resume_exactly() {
    for kind in ["set", "rigl", "diag"] {
        let (a, b) = (tmp(&format!("{kind}-a")), tmp(&format!("{kind}-b")));
        let common = [
            "train",
            "--model",
            "mlp",
            "--linear",
            kind,
            "--epochs",
            "4",
            "--batch-size",
            "32",
            "--update-every",
            "10",
        ];
        let mut straight = common.to_vec();
        straight.extend(["--threads", "1", "--quiet", "--json", "--out", a.to_str().unwrap()]);
        let v = json(&sbdnet(&straight));
        assert_eq!(v["nnz"].as_u64(), Some(26 * 64 + 26 * 256), "{kind}");
        assert!(v["test_accuracy"].as_f64().unwrap() > 0.5, "{kind}: {v}");
        let mut first = common.to_vec();
        first.extend(["--threads", "1", "--quiet", "--out", b.to_str().unwrap(), "--stop-after", "2"]);
        assert!(sbdnet(&first).status.success());
        let out = sbdnet(&["train", "--resume", b.to_str().unwrap(), "--quiet", "--threads", "1"]);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let read = |d: &std::path::Path| {
            let ck = sbdnet_nn::checkpoint::Checkpoint::read(d).unwrap();
            let mut v: Vec<_> = ck.tensors.into_iter().collect();
            v.sort_by(|x, y| x.0.cmp(&y.0));
            v
        };
        assert!(read(&a) == read(&b), "{kind}: resumed run differs");
    }
}

#[test]
fn linear_on_a_model_without_hidden_linear_layers_is_an_error() {
    let out = sbdnet(&["train", "--model", "dscnn", "--linear", "diag", "--epochs", "1", "--quiet"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no hidden linear layers"));
    let out = sbdnet(&["train", "--model", "mlp", "--linear", "set", "--sparsity", "1.5", "--epochs", "1"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("sparsity"));
}

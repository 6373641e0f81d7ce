//! End-to-end tests of `sbdnet plot` on small fake runs and CSV files.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn sbdnet(args: &[&str], envs: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_sbdnet"));
    cmd.args(args);
    for (k, v) in envs {
        cmd.env(k, v);
    }
    cmd.output().expect("the binary runs")
}

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("sbdnet-plot-test-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn ok(out: &Output) {
    assert!(out.status.success(), "failed: {}", String::from_utf8_lossy(&out.stderr));
}

/// A PNG file of a plausible size.
fn assert_png(path: &Path) {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    assert!(bytes.starts_with(b"\x89PNG\r\n\x1a\n"), "{} is not a PNG", path.display());
    assert!((1_000..5_000_000).contains(&bytes.len()), "{}: {} bytes", path.display(), bytes.len());
}

fn fake_run(dir: &Path, name: &str, precision: &str, epochs: usize, slope: f64) {
    std::fs::create_dir_all(dir).unwrap();
    let mut lines = String::new();
    for e in 1..=epochs {
        let acc = (0.3 + slope * e as f64).min(0.99);
        lines += &format!(
            "{{\"epoch\":{e},\"train_loss\":{},\"train_acc\":{acc},\"test_loss\":{},\"test_acc\":{acc},\
             \"images_per_s\":1000.0,\"seconds\":0.5,\"lr\":0.01}}\n",
            2.0 / e as f64,
            2.5 / e as f64
        );
    }
    std::fs::write(dir.join("metrics.jsonl"), lines).unwrap();
    std::fs::write(
        dir.join("config.json"),
        format!("{{\"name\":\"{name}\",\"quant\":{{\"precision\":\"{precision}\"}}}}"),
    )
    .unwrap();
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn curves_xy_and_heatmap_write_pngs() {
    let d = tmp("ok");
    let (a, b) = (d.join("dscnn-float"), d.join("dscnn-w1"));
    fake_run(&a, "dscnn", "float", 6, 0.1);
    fake_run(&b, "dscnn", "w1", 6, 0.08);

    let out = d.join("curves.png");
    ok(&sbdnet(&["plot", "curves", s(&a), s(&b), "-o", s(&out)], &[]));
    assert_png(&out);

    let out = d.join("loss.png");
    let args =
        ["plot", "curves", s(&a), s(&b), "-o", s(&out), "--metric", "train_loss", "--label", "A", "--label", "B"];
    ok(&sbdnet(&args, &[]));
    assert_png(&out);

    // Without text (SBDNET_FONT=none): still a figure.
    let out = d.join("nofont.png");
    ok(&sbdnet(&["plot", "curves", s(&a), "-o", s(&out), "--title", "T"], &[("SBDNET_FONT", "none")]));
    assert_png(&out);
    // An unreadable SBDNET_FONT is named in a warning (and the system fonts are tried next).
    let out = d.join("badfont.png");
    let r = sbdnet(&["plot", "curves", s(&a), "-o", s(&out)], &[("SBDNET_FONT", "/no/such/font.ttf")]);
    ok(&r);
    assert_png(&out);
    assert!(String::from_utf8_lossy(&r.stderr).contains("SBDNET_FONT"));

    let csv = d.join("sweep.csv");
    std::fs::write(&csv, "sparsity,acc,model\n0.5,90,a\n0.75,88,a\n0.9,80,a\n0.5,92,b\n0.75,91,b\n0.9,85,b\n").unwrap();
    let out = d.join("xy.png");
    ok(&sbdnet(
        &["plot", "xy", "--csv", s(&csv), "--x", "sparsity", "--y", "acc", "--group", "model", "-o", s(&out)],
        &[],
    ));
    assert_png(&out);
    let out = d.join("xylog.png");
    ok(&sbdnet(&["plot", "xy", "--csv", s(&csv), "--x", "sparsity", "--y", "acc", "--log-x", "-o", s(&out)], &[]));
    assert_png(&out);

    let m = d.join("mask.csv");
    let rows: Vec<String> = (0..24)
        .map(|i| (0..40).map(|j| ((i * 7 + j * 3) % 5 == 0) as u8).map(|v| v.to_string()).collect::<Vec<_>>().join(","))
        .collect();
    std::fs::write(&m, rows.join("\n")).unwrap();
    let out = d.join("heat.png");
    ok(&sbdnet(&["plot", "heatmap", "--csv", s(&m), "-o", s(&out)], &[]));
    assert_png(&out);

    // Larger than 512 rows: max-pooled.
    let big = d.join("big.csv");
    let rows: Vec<String> = (0..1100).map(|i| format!("{} {} {}", i % 3, i % 5, i % 7)).collect();
    std::fs::write(&big, rows.join("\n")).unwrap();
    let out = d.join("big.png");
    ok(&sbdnet(&["plot", "heatmap", "--csv", s(&big), "-o", s(&out), "--gray"], &[("SBDNET_FONT", "none")]));
    assert_png(&out);

    let _ = std::fs::remove_dir_all(&d);
}

/// Fails with a non-zero status, a message containing `needle`, and no panic.
fn fails_with(args: &[&str], needle: &str) {
    let r = sbdnet(args, &[]);
    let err = String::from_utf8_lossy(&r.stderr);
    assert!(!r.status.success(), "{args:?} succeeded");
    assert!(err.contains(needle), "{args:?}: '{needle}' not in: {err}");
    assert!(!err.contains("panicked"), "{args:?} panicked: {err}");
}

#[test]
fn bad_inputs_give_clear_errors() {
    let d = tmp("bad");
    let out = d.join("x.png");
    let missing = d.join("no-such-run");
    fails_with(&["plot", "curves", s(&missing), "-o", s(&out)], s(&missing));

    let run = d.join("run");
    std::fs::create_dir_all(&run).unwrap();
    fails_with(&["plot", "curves", s(&run), "-o", s(&out)], "metrics.jsonl");
    std::fs::write(run.join("metrics.jsonl"), "").unwrap();
    fails_with(&["plot", "curves", s(&run), "-o", s(&out)], "no epochs");
    std::fs::write(run.join("metrics.jsonl"), "{\"epoch\":1,\"test_acc\":0.5}\n{\"epoch\":2,\n").unwrap();
    fails_with(&["plot", "curves", s(&run), "-o", s(&out)], "metrics.jsonl:2");

    let csv = d.join("t.csv");
    std::fs::write(&csv, "a,b\n1,2\n3,x\n").unwrap();
    fails_with(&["plot", "xy", "--csv", s(&csv), "--x", "a", "--y", "zz", "-o", s(&out)], "no column 'zz'");
    fails_with(&["plot", "xy", "--csv", s(&csv), "--x", "a", "--y", "b", "-o", s(&out)], "t.csv:3");
    std::fs::write(&csv, "1,2\n3,oops\n").unwrap();
    fails_with(&["plot", "heatmap", "--csv", s(&csv), "-o", s(&out)], "t.csv:2");
    assert!(!out.exists());

    let _ = std::fs::remove_dir_all(&d);
}

#[test]
fn layer_of_a_trained_diag_model_is_drawn_with_its_diagonals() {
    let d = tmp("layer");
    let run = d.join("run");
    let r = run.to_str().unwrap();
    ok(&sbdnet(
        &["train", "--model", "mlp", "--linear", "diag", "--sparsity", "0.9", "--epochs", "1", "--quiet", "--out", r],
        &[],
    ));
    let png = d.join("fc2.png");
    ok(&sbdnet(&["plot", "layer", r, "--layer", "fc2", "-o", png.to_str().unwrap()], &[("SBDNET_FONT", "none")]));
    assert_png(&png);
    // The CSV beside it holds |W|: 256 x 256 with exactly K * D = 26 * 256 non-zeros.
    let csv = std::fs::read_to_string(d.join("fc2.csv")).unwrap();
    let rows: Vec<Vec<f32>> = csv.lines().map(|l| l.split(',').map(|v| v.parse().unwrap()).collect()).collect();
    assert_eq!((rows.len(), rows[0].len()), (256, 256));
    let nnz = rows.iter().flatten().filter(|&&v| v != 0.0).count();
    assert!(nnz <= 26 * 256 && nnz > 20 * 256, "{nnz}");
    let out = sbdnet(&["plot", "layer", r, "--layer", "fc2.relu", "-o", png.to_str().unwrap()], &[]);
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("no weight matrix"));
    // A token-wise layer of a transformer is drawn as its own 576 x 192 matrix (not per token).
    let vit = d.join("vit");
    let v = vit.to_str().unwrap();
    let args = ["train", "--model", "vit-tiny", "--linear", "diag", "--sparsity", "0.9", "--epochs", "1", "--quiet"];
    ok(&sbdnet(&[&args[..], &["--out", v]].concat(), &[]));
    let png = d.join("qkv.png");
    ok(&sbdnet(
        &["plot", "layer", v, "--layer", "blk1.attn.qkv", "-o", png.to_str().unwrap()],
        &[("SBDNET_FONT", "none")],
    ));
    let csv = std::fs::read_to_string(d.join("qkv.csv")).unwrap();
    let rows: Vec<usize> = csv.lines().map(|l| l.split(',').count()).collect();
    assert_eq!(rows.len(), 576);
    assert!(rows.iter().all(|&c| c == 192), "{:?}", &rows[..3]);
}

#[test]
fn group_mask_of_a_sw1_layer_is_drawn() {
    let d = tmp("mask");
    let run = d.join("run");
    let r = run.to_str().unwrap();
    let train = ["train", "--precision", "sw1", "--target-sparsity", "0.5", "--epochs", "2", "--prune-every", "5"];
    let mut train = train.to_vec();
    train.extend(["--prune-start-epochs", "0", "--quiet", "--threads", "1", "--out", r]);
    ok(&sbdnet(&train, &[]));
    let png = d.join("mask.png");
    let args = ["plot", "layer", r, "--layer", "block4.pw", "--mask", "-o", png.to_str().unwrap()];
    ok(&sbdnet(&args, &[("SBDNET_FONT", "none")]));
    assert_png(&png);
    // block4.pw: 128 -> 256 channels, G = 16: a 256 x 8 grid of 0/1, about half of it zero.
    let csv = std::fs::read_to_string(d.join("mask.csv")).unwrap();
    let rows: Vec<Vec<f32>> = csv.lines().map(|l| l.split(',').map(|v| v.parse().unwrap()).collect()).collect();
    assert_eq!((rows.len(), rows[0].len()), (256, 8));
    assert!(rows.iter().flatten().all(|&v| v == 0.0 || v == 1.0));
    let zeros = rows.iter().flatten().filter(|&&v| v == 0.0).count();
    assert!(zeros > 900 && zeros < 1200, "{zeros} of 2048 groups zero");
    let out = sbdnet(&["plot", "layer", r, "--layer", "conv1", "--mask", "-o", png.to_str().unwrap()], &[]);
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("no group mask"));
}

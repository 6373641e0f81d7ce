//! Sparse linear layers: finite-difference gradients (DynaDiag soft and frozen phases, masked
//! dense), exact nnz under dynamic sparse training, pruned weights staying zero, checkpoint
//! round trips of offsets and masks.

use sbdnet_kernels::rng::Rng;
use sbdnet_nn::checkpoint::{self, Checkpoint};
use sbdnet_nn::model::Op;
use sbdnet_nn::{Act, Block, Loss, Model, ModelConfig, Optimizer, OptimizerConfig, SparseKind, SparseSpec};

/// Flatten, sparse 12 -> 20 (tall) + ReLU, sparse 20 -> 9 (wide) + ReLU, dense classifier.
fn mlp(kind: SparseKind, sparsity: f64, update_every: usize) -> ModelConfig {
    let spec = SparseSpec { update_every, ..SparseSpec::new(kind, sparsity) };
    let fc = |out, act, sparse| Block::Linear { out, bias: true, act, sparse };
    let blocks =
        vec![Block::Flatten, fc(20, Act::Relu, Some(spec)), fc(9, Act::Relu, Some(spec)), fc(4, Act::None, None)];
    ModelConfig { name: "tiny-mlp".into(), input: [3, 4, 1], classes: 4, blocks, quant: Default::default() }
}

fn data(n: usize, il: usize, classes: usize, seed: u64) -> (Vec<f32>, Vec<u8>) {
    let mut r = Rng::new(seed);
    let x = (0..n * il).map(|_| r.normal()).collect();
    let y = (0..n).map(|i| (i % classes) as u8).collect();
    (x, y)
}

fn loss_at(m: &mut Model, x: &[f32], y: &[u8]) -> f64 {
    let logits = m.forward(x, y.len(), true).unwrap().to_vec();
    Loss::default().evaluate(&logits, y, m.config.classes).0 as f64
}

/// Compare the analytic gradient with central differences at every coordinate of the
/// parameters `select` accepts (tensor name, index within it).
fn fd_check(m: &mut Model, x: &[f32], y: &[u8], select: impl Fn(&str, usize) -> bool) -> usize {
    m.train_step(x, y, &Loss::default()).unwrap();
    let grad = m.params.grad.clone();
    let (mut checked, mut kinks) = (0, 0);
    let mut failures = Vec::new();
    for t in m.params.tensors.clone() {
        for j in 0..t.len() {
            if !select(&t.name, j) {
                continue;
            }
            let i = t.offset + j;
            let orig = m.params.data[i];
            let mut fd_at = |h: f32| {
                m.params.data[i] = orig + h;
                let lp = loss_at(m, x, y);
                m.params.data[i] = orig - h;
                let lm = loss_at(m, x, y);
                m.params.data[i] = orig;
                (lp - lm) / (2.0 * h as f64)
            };
            let (fd, fd_half) = (fd_at(1e-3), fd_at(5e-4));
            checked += 1;
            if (fd - fd_half).abs() > 5e-4 + 1e-2 * fd.abs() {
                kinks += 1;
                continue;
            }
            let an = grad[i] as f64;
            if (fd - an).abs() > 1e-3 + 3e-2 * an.abs() {
                failures.push(format!("{}[{j}]: analytic {an:.6} vs numeric {fd:.6}", t.name));
            }
        }
    }
    assert!(kinks * 5 <= checked, "{kinks} of {checked} coordinates on kinks");
    assert!(failures.is_empty(), "{failures:#?}");
    checked
}

fn diag_layers(m: &Model) -> Vec<&sbdnet_nn::sparse::DiagLinear> {
    m.nodes
        .iter()
        .filter_map(|n| match &n.op {
            Op::DiagLinear(l) => Some(l),
            _ => None,
        })
        .collect()
}

#[test]
fn diag_soft_phase_gradients_values_alpha_bias() {
    let mut m = Model::new(mlp(SparseKind::Diag, 0.8, 100), 5, 1).unwrap();
    // Spread the importance scores so the soft weights differ (all below the clamp).
    let mut r = Rng::new(9);
    for t in m.params.tensors.clone().iter().filter(|t| t.name.ends_with(".alpha")) {
        for v in &mut m.params.data[t.range()] {
            *v = 0.5 * r.normal();
        }
    }
    assert!(diag_layers(&m).iter().all(|l| !l.frozen() && l.c > l.k));
    let (x, y) = data(5, 12, 4, 2);
    let n = fd_check(&mut m, &x, &y, |_, _| true);
    assert!(n > 200, "{n}");
}

#[test]
fn diag_frozen_gradients() {
    let cfg = mlp(SparseKind::Diag, 0.8, 100);
    let mut m = Model::new(cfg, 5, 3).unwrap();
    let mut opt = Optimizer::new(OptimizerConfig::default(), m.params.len());
    let (x, y) = data(5, 12, 4, 4);
    m.train_step(&x, &y, &Loss::default()).unwrap();
    m.after_step(10, 10, &mut opt); // past the freeze point
    let layers: Vec<(String, usize, usize)> = m
        .nodes
        .iter()
        .filter_map(|n| match &n.op {
            Op::DiagLinear(l) => {
                assert!(l.frozen());
                assert_eq!(l.nnz(), l.k * l.diag_len());
                Some((format!("{}.values", n.name), l.k, l.diag_len()))
            }
            _ => None,
        })
        .collect();
    // Only the kept rows are parameters of the function now.
    let kept =
        |name: &str, j: usize| layers.iter().all(|(n, k, d)| n != name || j < k * d) && !name.ends_with(".alpha");
    fd_check(&mut m, &x, &y, kept);
    // The dropped rows get no gradient.
    for (name, k, d) in &layers {
        let t = m.params.tensors.iter().find(|t| &t.name == name).unwrap();
        assert!(m.params.grad[t.range()][k * d..].iter().all(|&g| g == 0.0));
        assert!(m.params.data[t.range()][k * d..].iter().all(|&v| v == 0.0));
    }
}

#[test]
fn masked_gradients_on_the_mask_and_zero_off_it() {
    for kind in [SparseKind::Set, SparseKind::Rigl] {
        let mut m = Model::new(mlp(kind, 0.7, 100), 5, 5).unwrap();
        let masks: Vec<(String, Vec<f32>)> = m
            .params
            .buffer_tensors
            .iter()
            .filter(|t| t.name.ends_with(".mask"))
            .map(|t| (t.name.replace(".mask", ".weight"), m.params.buffers[t.range()].to_vec()))
            .collect();
        assert_eq!(masks.len(), 2);
        let (x, y) = data(5, 12, 4, 6);
        let on = |name: &str, j: usize| masks.iter().all(|(n, mk)| n != name || mk[j] == 1.0);
        fd_check(&mut m, &x, &y, on);
        for (name, mk) in &masks {
            let t = m.params.tensors.iter().find(|t| &t.name == name).unwrap();
            for ((&g, &w), &k) in m.params.grad[t.range()].iter().zip(&m.params.data[t.range()]).zip(mk) {
                if k == 0.0 {
                    assert_eq!((g, w), (0.0, 0.0), "{name}");
                }
            }
        }
    }
}

/// Train `steps` steps with pattern updates every 5 steps; check the invariants after each.
fn run_dst(kind: SparseKind, opt_cfg: OptimizerConfig) -> Model {
    let cfg = mlp(kind, 0.75, 5);
    let mut m = Model::new(cfg, 8, 11).unwrap();
    let mut opt = Optimizer::new(opt_cfg, m.params.len());
    let total = 200;
    let mut changes = 0;
    let mut last_pattern = pattern(&m);
    for step in 0..total {
        let (x, y) = data(8, 12, 4, 100 + step as u64);
        m.train_step(&x, &y, &Loss::default()).unwrap();
        opt.step(&mut m.params, 0.05);
        m.after_step(step + 1, total, &mut opt);
        for l in m.sparse_layers() {
            match kind {
                SparseKind::Diag if step + 1 >= 60 => assert_eq!(l.nnz, l.target_nnz, "{step}: {l:?}"),
                SparseKind::Diag => assert_eq!(l.nnz, l.candidates_nnz, "{step}: {l:?}"),
                _ => assert_eq!(l.nnz, l.target_nnz, "{step}: {l:?}"),
            }
        }
        let p = pattern(&m);
        changes += usize::from(p != last_pattern);
        last_pattern = p;
        check_zeros(&m);
    }
    assert!(changes >= 3, "{kind:?}: the pattern changed only {changes} times");
    m
}

/// Offsets and masks of every sparse layer.
fn pattern(m: &Model) -> Vec<f32> {
    m.params
        .buffer_tensors
        .iter()
        .filter(|t| t.name.ends_with(".mask") || t.name.ends_with(".offsets"))
        .flat_map(|t| m.params.buffers[t.range()].to_vec())
        .collect()
}

/// Weights outside the pattern are exactly zero (masked layers; frozen diagonal layers' dropped
/// rows).
fn check_zeros(m: &Model) {
    for node in &m.nodes {
        match &node.op {
            Op::MaskedLinear(l) => {
                let (w, mk) = (&m.params.data[l.weight.range()], &m.params.buffers[l.mask.range()]);
                assert_eq!(mk.iter().filter(|&&k| k == 1.0).count(), l.target_nnz);
                assert!(w.iter().zip(mk).all(|(&w, &k)| k == 1.0 || w == 0.0), "{}", node.name);
            }
            Op::DiagLinear(l) if l.frozen() => {
                let v = &m.params.data[l.values.range()];
                assert!(v[l.k * l.diag_len()..].iter().all(|&v| v == 0.0), "{}", node.name);
                let offs = &m.params.buffers[l.offsets.range()];
                assert!(offs[..l.k].iter().all(|&o| o >= 0.0) && offs[l.k..].iter().all(|&o| o == -1.0));
            }
            _ => {}
        }
    }
}

#[test]
fn nnz_is_exact_and_pruned_weights_stay_zero_under_updates() {
    for opt in [
        OptimizerConfig::default(),
        OptimizerConfig { kind: sbdnet_nn::OptimizerKind::AdamW, weight_decay: 0.01, ..Default::default() },
    ] {
        for kind in [SparseKind::Diag, SparseKind::Set, SparseKind::Rigl] {
            run_dst(kind, opt);
        }
    }
}

#[test]
fn equal_budgets_across_kinds() {
    let budgets: Vec<Vec<usize>> = [SparseKind::Diag, SparseKind::Set, SparseKind::Rigl]
        .map(|k| Model::new(mlp(k, 0.9, 5), 2, 0).unwrap().sparse_layers().iter().map(|l| l.target_nnz).collect())
        .to_vec();
    assert_eq!(budgets[0], budgets[1]);
    assert_eq!(budgets[0], budgets[2]);
    // 784 -> 256 at 90%: K = ceil(0.1 * 784) = 79 diagonals of 256.
    let cfg = ModelConfig::preset("mlp", [28, 28, 1], 10)
        .unwrap()
        .with_hidden_linear(Some(SparseSpec::new(SparseKind::Diag, 0.9)));
    let m = Model::new(cfg, 1, 0).unwrap();
    let l = m.sparse_layers();
    assert_eq!(l.len(), 2);
    assert_eq!((l[0].target_nnz, l[1].target_nnz), (79 * 256, 26 * 256));
}

#[test]
fn checkpoint_restores_offsets_and_masks() {
    for kind in [SparseKind::Diag, SparseKind::Rigl, SparseKind::Set] {
        let m = run_dst(kind, OptimizerConfig::default());
        let dir = std::env::temp_dir().join(format!("sbdnet-sparse-ck-{}-{}", std::process::id(), kind.name()));
        let _ = std::fs::remove_dir_all(&dir);
        checkpoint::save(&dir, &m, None, "{}").unwrap();
        let ck = Checkpoint::read(&dir).unwrap();
        // A different seed draws a different initial pattern: loading must replace it.
        let mut fresh = Model::new(ck.config.clone(), 8, 999).unwrap();
        assert_ne!(pattern(&fresh), pattern(&m));
        ck.apply(&mut fresh, None, &dir).unwrap();
        assert_eq!(pattern(&fresh), pattern(&m));
        let mut m = m;
        let (x, _) = data(8, 12, 4, 7);
        let a = m.forward(&x, 8, false).unwrap().to_vec();
        let b = fresh.forward(&x, 8, false).unwrap().to_vec();
        assert_eq!(a, b, "{kind:?}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

#[test]
fn diag_soft_phase_checkpoint_keeps_candidates() {
    let mut m = Model::new(mlp(SparseKind::Diag, 0.75, 5), 8, 2).unwrap();
    let mut opt = Optimizer::new(OptimizerConfig::default(), m.params.len());
    for step in 0..20 {
        let (x, y) = data(8, 12, 4, step);
        m.train_step(&x, &y, &Loss::default()).unwrap();
        opt.step(&mut m.params, 0.05);
        m.after_step(step as usize + 1, 1000, &mut opt);
    }
    let dir = std::env::temp_dir().join(format!("sbdnet-sparse-soft-{}", std::process::id()));
    checkpoint::save(&dir, &m, Some(&opt), "{}").unwrap();
    let ck = Checkpoint::read(&dir).unwrap();
    let mut fresh = Model::new(ck.config.clone(), 8, 5).unwrap();
    ck.apply(&mut fresh, None, &dir).unwrap();
    let (x, _) = data(8, 12, 4, 77);
    assert_eq!(m.forward(&x, 8, true).unwrap().to_vec(), fresh.forward(&x, 8, true).unwrap().to_vec());
    let (a, b) = (diag_layers(&m), diag_layers(&fresh));
    for (a, b) in a.iter().zip(&b) {
        assert_eq!(a.active_offsets(), b.active_offsets());
        assert_eq!(a.temperature(), b.temperature());
        assert!(!b.frozen());
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn bad_sparse_configs_are_errors() {
    let mut cfg = mlp(SparseKind::Diag, 0.9, 5);
    if let Block::Linear { sparse: Some(s), .. } = &mut cfg.blocks[1] {
        s.sparsity = 1.0;
    }
    assert!(Model::new(cfg, 2, 0).is_err());
    let cfg = mlp(SparseKind::Set, 0.9, 0);
    assert!(Model::new(cfg, 2, 0).is_err());
    // Old configurations (no `act`, no `sparse`) still load as dense, no activation.
    let b: Block = serde_json::from_str(r#"{"type":"linear","out":3,"bias":true}"#).unwrap();
    assert_eq!(b, Block::Linear { out: 3, bias: true, act: Act::None, sparse: None });
}

/// `alpha_lr` scales the importance scores' gradient and nothing else.
#[test]
fn diag_alpha_lr_scales_only_the_importance_gradient() {
    let grads = |alpha_lr: f32| {
        let mut cfg = mlp(SparseKind::Diag, 0.8, 100);
        for b in &mut cfg.blocks {
            if let Block::Linear { sparse: Some(s), .. } = b {
                s.alpha_lr = alpha_lr;
            }
        }
        let mut m = Model::new(cfg, 5, 7).unwrap();
        let (x, y) = data(5, 12, 4, 8);
        m.train_step(&x, &y, &Loss::default()).unwrap();
        m.params.tensors.iter().map(|t| (t.name.clone(), m.params.grad[t.range()].to_vec())).collect::<Vec<_>>()
    };
    let (g1, g3) = (grads(1.0), grads(3.0));
    let mut alphas = 0;
    for ((name, a), (_, b)) in g1.iter().zip(&g3) {
        let k = if name.ends_with(".alpha") { 3.0 } else { 1.0 };
        alphas += usize::from(k == 3.0);
        assert!(a.iter().any(|&v| v != 0.0), "{name}: zero gradient");
        for (&u, &v) in a.iter().zip(b) {
            assert!((u * k - v).abs() <= 1e-6 * (1.0 + v.abs()), "{name}: {u} x {k} vs {v}");
        }
    }
    assert_eq!(alphas, 2);
}

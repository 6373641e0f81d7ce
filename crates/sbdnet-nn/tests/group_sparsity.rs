//! Sparse BD-Net (precisions sw1 / sw1a1): the clipped group lasso's gradient against finite
//! differences, weight penalty clipping on hand-made groups, alpha over surviving weights, and
//! pruned groups staying exactly zero through training (SGD momentum, Adam) and checkpoints.

use sbdnet_kernels::rng::Rng;
use sbdnet_nn::group::{penalty, GroupLayout};
use sbdnet_nn::model::Op;
use sbdnet_nn::quant::{Groups, WeightBinarizer};
use sbdnet_nn::{Loss, Model, ModelConfig, Optimizer, OptimizerConfig, OptimizerKind, Precision, QuantConfig};

/// `R = sum_g sqrt(|g|) min(n_g, tau)` over unmasked groups with `tau` held fixed, in f64.
fn r_fixed(w: &[f32], l: &GroupLayout, mask: &[f32], tau: f64) -> f64 {
    l.ranges()
        .zip(mask)
        .filter(|(_, &m)| m != 0.0)
        .map(|(r, _)| {
            let n = w[r.clone()].iter().map(|&v| v as f64 * v as f64).sum::<f64>().sqrt();
            (r.len() as f64).sqrt() * n.min(tau)
        })
        .sum()
}

#[test]
fn penalty_gradient_matches_finite_differences() {
    let mut rng = Rng::new(7);
    // 6 rows of 20 inputs, G = 8: groups of 8, 8, 4 (a short one), 18 groups, two masked.
    let l = GroupLayout::new(120, 20, 8);
    let mut w: Vec<f32> = (0..120).map(|_| rng.normal()).collect();
    // Spread the group norms so that some fall below tau.
    for (g, r) in l.ranges().enumerate() {
        let s = 0.1 + 0.15 * g as f32;
        w[r].iter_mut().for_each(|v| *v *= s);
    }
    let mut mask = vec![1.0f32; l.groups()];
    mask[3] = 0.0;
    mask[10] = 0.0;
    let (ratio, lambda) = (0.7, 0.37);
    let mut grad = vec![0.0f32; 120];
    let s = penalty(&w, &l, &mask, ratio, lambda, &mut grad);
    let tau = s.tau as f64;
    assert!(s.active >= 3 && s.active + 6 < l.groups(), "{} groups below tau: a poor test case", s.active);
    assert!((s.value - r_fixed(&w, &l, &mask, tau)).abs() < 1e-4 * s.value);
    let (mut checked, mut failures) = (0, Vec::new());
    for i in 0..120 {
        let g = i / 20 * 3 + (i % 20) / 8;
        let fd = |h: f32| {
            let mut wp = w.clone();
            wp[i] += h;
            let up = r_fixed(&wp, &l, &mask, tau);
            wp[i] -= 2.0 * h;
            (up - r_fixed(&wp, &l, &mask, tau)) / (2.0 * h as f64)
        };
        let (a, b) = (fd(1e-3), fd(5e-4));
        if (a - b).abs() > 1e-4 {
            continue; // the kink n_g = tau lies within the step
        }
        checked += 1;
        let an = grad[i] as f64 / lambda as f64;
        if (a - an).abs() > 1e-3 + 1e-3 * a.abs() {
            failures.push(format!("w[{i}] (group {g}): analytic {an:.6} vs numeric {a:.6}"));
        }
        if mask[g] == 0.0 {
            assert_eq!(grad[i], 0.0, "masked group {g} got a gradient");
        }
    }
    assert!(checked > 100, "only {checked} coordinates checked");
    assert!(failures.is_empty(), "{failures:#?}");
}

#[test]
fn clipping_leaves_groups_above_tau_alone() {
    // Five groups of 4, norms 0.2, 1, 2, 3, 8; the last one is masked (excluded from tau).
    let l = GroupLayout::new(20, 20, 4);
    let w = [
        0.1f32, 0.1, 0.1, 0.1, // 0.2
        0.5, -0.5, 0.5, -0.5, // 1
        1.0, 1.0, -1.0, 1.0, // 2
        1.5, 1.5, 1.5, -1.5, // 3
        4.0, 4.0, 4.0, 4.0, // 8 (masked)
    ];
    let mask = [1.0, 1.0, 1.0, 1.0, 0.0];
    let mut g = [0.0f32; 20];
    // tau = 0.8 * mean(0.2, 1, 2, 3) = 0.8 * 1.55 = 1.24: groups 0 and 1 are pushed.
    let s = penalty(&w, &l, &mask, 0.8, 1.0, &mut g);
    assert!((s.tau - 1.24).abs() < 1e-6, "tau {}", s.tau);
    assert_eq!(s.active, 2);
    // R = 2 * (0.2 + 1 + 1.24 + 1.24).
    assert!((s.value - 2.0 * 3.68).abs() < 1e-5, "R {}", s.value);
    // Pushed groups: sqrt(4) * w / n, i.e. a unit vector times 2.
    for i in 0..4 {
        assert!((g[i] - 2.0 * 0.5).abs() < 1e-6, "{g:?}");
        assert!((g[4 + i] - 2.0 * w[4 + i]).abs() < 1e-6, "{g:?}");
    }
    assert!(g[8..].iter().all(|&v| v == 0.0), "groups at or above tau or masked got a gradient: {g:?}");
    // A larger ratio reaches group 2 (tau = 2.17) but never the strongest.
    let mut g = [0.0f32; 20];
    let s = penalty(&w, &l, &mask, 1.4, 1.0, &mut g);
    assert_eq!(s.active, 3);
    assert!(g[8..12].iter().all(|&v| v != 0.0) && g[12..].iter().all(|&v| v == 0.0));
}

#[test]
fn alpha_is_the_mean_over_surviving_weights() {
    let q = QuantConfig { precision: Precision::SW1, ..Default::default() };
    let mut b = WeightBinarizer::new(&q, 2, 8);
    // Two output rows of 4, groups of 2; the second group of row 0 is pruned.
    let mut buffers = vec![1.0f32, 0.0, 1.0, 1.0];
    b.groups =
        Some(Groups { layout: GroupLayout::new(8, 4, 2), mask: sbdnet_nn::params::ParamId { offset: 0, len: 4 } });
    let w = [1.0f32, -3.0, 100.0, 100.0, 2.0, -2.0, 0.5, 0.5];
    b.binarize(&w, &buffers);
    let a = (1.0 + 3.0 + 2.0 + 2.0 + 0.5 + 0.5) / 6.0;
    assert_eq!(b.wb, vec![a, -a, 0.0, 0.0, a, -a, a, a]);
    b.per_channel = true;
    b.binarize(&w, &buffers);
    assert_eq!(b.alpha, vec![2.0, 1.25]);
    // Pruned weights get no straight-through gradient.
    b.dwb.fill(0.5);
    let mut g = [0.0f32; 8];
    b.clip = None;
    b.backward(&w, &mut g, &buffers);
    assert_eq!(g, [0.5, 0.5, 0.0, 0.0, 0.5, 0.5, 0.5, 0.5]);
    // A row with nothing left has alpha 0.
    buffers[1] = 0.0;
    buffers[0] = 0.0;
    b.binarize(&w, &buffers);
    assert_eq!(b.alpha[0], 0.0);
    assert!(b.wb[..4].iter().all(|&v| v == 0.0));
}

fn sparse_model(precision: Precision, group_size: usize) -> Model {
    let q = QuantConfig { precision, group_size, ..Default::default() };
    let cfg = ModelConfig::build("dscnn", [8, 8, 1], 10, 0.25, q).unwrap();
    Model::new(cfg, 8, 1).unwrap()
}

fn batch(r: &mut Rng) -> (Vec<f32>, Vec<u8>) {
    ((0..8 * 64).map(|_| r.normal()).collect(), (0..8).map(|i| (i % 10) as u8).collect())
}

/// Every pruned group's latent weights, deployed weights and optimizer state are exactly 0.
fn assert_pruned_are_zero(m: &mut Model, opt: Option<&Optimizer>, what: &str) -> usize {
    // Binarize with the current weights (a forward pass).
    let x = vec![0.1f32; 8 * 64];
    m.forward(&x, 8, false).unwrap();
    let mut zero_groups = 0;
    for node in &m.nodes {
        let Op::Conv(c) = &node.op else { continue };
        let Some(b) = &c.bin else { continue };
        let g = b.groups.expect("sparse precision: every binarized conv has groups");
        let mask = &m.params.buffers[g.mask.range()];
        for (r, &k) in g.layout.ranges().zip(mask) {
            let off = c.weight.offset;
            let range = off + r.start..off + r.end;
            if k == 0.0 {
                zero_groups += 1;
                assert!(m.params.data[range.clone()].iter().all(|&v| v == 0.0), "{what}: {} latent", node.name);
                assert!(b.wb[r.clone()].iter().all(|&v| v == 0.0), "{what}: {} deployed", node.name);
                if let Some(o) = opt {
                    assert!(o.m[range.clone()].iter().all(|&v| v == 0.0), "{what}: {} momentum", node.name);
                    assert!(o.v.is_empty() || o.v[range].iter().all(|&v| v == 0.0), "{what}: {}", node.name);
                }
            } else {
                assert!(b.wb[r].iter().all(|&v| v != 0.0), "{what}: {} kept group has zeros", node.name);
            }
        }
    }
    zero_groups
}

#[test]
fn pruned_groups_stay_exactly_zero_through_training_and_checkpoints() {
    for (kind, precision) in [
        (OptimizerKind::Sgd, Precision::SW1),
        (OptimizerKind::Adam, Precision::SW1A1),
        (OptimizerKind::AdamW, Precision::SW1),
    ] {
        let mut m = sparse_model(precision, 4);
        let cfg = OptimizerConfig { kind, weight_decay: 1e-2, ..Default::default() };
        let mut opt = Optimizer::new(cfg, m.params.len());
        let lr = if kind == OptimizerKind::Sgd { 0.1 } else { 1e-2 };
        let mut r = Rng::new(3);
        let loss = Loss::default();
        let step = |m: &mut Model, opt: &mut Optimizer, r: &mut Rng| {
            let (x, y) = batch(r);
            m.train_step(&x, &y, &loss).unwrap();
            m.group_penalty(0.05, 0.7);
            opt.step(&mut m.params, lr);
        };
        // Build up optimizer state everywhere first, so that only the masking keeps pruned
        // groups from moving.
        for _ in 0..5 {
            step(&mut m, &mut opt, &mut r);
        }
        let pruned = m.prune_groups(0.5, 0.25, 0.0, Some(&mut opt));
        let total: usize = m.group_layers().iter().map(|g| g.groups).sum();
        assert!(pruned > total / 3, "{kind:?}: pruned {pruned} of {total}");
        let sp: f64 = {
            let g = m.group_layers();
            g.iter().map(|l| l.zero_weights).sum::<usize>() as f64 / g.iter().map(|l| l.weights).sum::<usize>() as f64
        };
        assert!((sp - 0.5).abs() < 0.02, "{kind:?}: weight sparsity {sp}");
        for _ in 0..10 {
            step(&mut m, &mut opt, &mut r);
        }
        let z = assert_pruned_are_zero(&mut m, Some(&opt), &format!("{kind:?} after training"));
        assert_eq!(z, pruned);

        // Through a checkpoint: masks and zeros come back, and training on stays exact.
        let dir = std::env::temp_dir().join(format!("sbdnet-group-{}-{kind:?}", std::process::id()));
        sbdnet_nn::checkpoint::save(&dir, &m, Some(&opt), "{}").unwrap();
        let ck = sbdnet_nn::checkpoint::Checkpoint::read(&dir).unwrap();
        let masks: Vec<_> = ck.tensors.keys().filter(|k| k.ends_with(".group_mask")).collect();
        assert_eq!(masks.len(), 8, "{masks:?}");
        let mut m2 = Model::new(ck.config.clone(), 8, 99).unwrap();
        let mut opt2 = Optimizer::new(cfg, m2.params.len());
        ck.apply(&mut m2, Some(&mut opt2), &dir).unwrap();
        assert_eq!(m2.group_layers(), m.group_layers());
        assert_eq!(m2.params.data, m.params.data);
        for _ in 0..5 {
            step(&mut m2, &mut opt2, &mut r);
        }
        assert_eq!(assert_pruned_are_zero(&mut m2, Some(&opt2), &format!("{kind:?} after load")), pruned);
        let _ = std::fs::remove_dir_all(&dir);
    }
}

#[test]
fn without_masking_pruned_weights_would_move() {
    // The check above can fail: clearing a mask by hand lets the weights regrow.
    let mut m = sparse_model(Precision::SW1, 4);
    let mut opt = Optimizer::new(OptimizerConfig::default(), m.params.len());
    let mut r = Rng::new(5);
    m.prune_groups(0.5, 0.0, 0.0, Some(&mut opt));
    let name = m.group_layers()[1].name.clone();
    let t = m.params.buffer_tensors.iter().find(|t| t.name == format!("{name}.group_mask")).unwrap().clone();
    m.params.buffers[t.range()].fill(1.0);
    let (x, y) = batch(&mut r);
    m.train_step(&x, &y, &Loss::default()).unwrap();
    opt.step(&mut m.params, 0.1);
    let w = m.params.get(&format!("{name}.weight")).unwrap();
    assert_eq!(w.iter().filter(|&&v| v == 0.0).count(), 0, "unmasked groups must move again");
}

#[test]
fn group_shapes_and_old_configurations() {
    let m = sparse_model(Precision::SW1, 16);
    let shape = |n: &str| m.params.buffer_tensors.iter().find(|t| t.name == n).unwrap().shape.clone();
    // Width 0.25: block1 is 8 -> 16 channels, block4 32 -> 64.
    assert_eq!(shape("block1.dw.group_mask"), vec![8, 1, 1, 1]);
    assert_eq!(shape("block1.pw.group_mask"), vec![16, 1, 1, 1]); // G = 16 > 8 inputs: one group
    assert_eq!(shape("block4.pw.group_mask"), vec![64, 1, 1, 2]);
    assert!(!m.params.buffer_tensors.iter().any(|t| t.name == "conv1.group_mask"), "the float first conv is dense");
    // Configurations saved before sparse precisions existed still load (group_size defaults).
    let old = r#"{"name":"dscnn","input":[8,8,1],"classes":10,"blocks":[{"type":"conv","out":4,"kernel":3,"stride":1,"act":"relu"},{"type":"global_avg_pool"},{"type":"linear","out":10,"bias":true}],
        "quant":{"precision":"w1","alpha_per_channel":false,"ste_clip":1.0,"grad_scale":false,"binarize_first_last":false}}"#;
    let cfg: ModelConfig = serde_json::from_str(old).unwrap();
    assert_eq!(cfg.quant.precision, Precision::W1);
    assert_eq!(cfg.quant.group_size, 16);
    let new = serde_json::to_string(&m.config).unwrap();
    assert!(new.contains(r#""precision":"sw1""#) && new.contains(r#""group_size":16"#), "{new}");
    for (p, bw, ba, sp) in [
        (Precision::Float, false, false, false),
        (Precision::W1, true, false, false),
        (Precision::W1A1, true, true, false),
        (Precision::SW1, true, false, true),
        (Precision::SW1A1, true, true, true),
    ] {
        assert_eq!((p.binary_weights(), p.binary_acts(), p.sparse()), (bw, ba, sp), "{p:?}");
        assert_eq!(p.name().parse::<Precision>().unwrap(), p);
    }
}

#[test]
fn every_model_builds_at_sparse_precisions() {
    for name in ["dscnn", "cnn", "bdnet", "mobilenet", "resnet20-ds"] {
        for precision in [Precision::SW1, Precision::SW1A1] {
            let q = QuantConfig { precision, group_size: 8, ..Default::default() };
            let cfg = ModelConfig::build(name, [32, 32, 1], 10, 0.25, q).unwrap();
            let mut m = Model::new(cfg, 2, 0).unwrap();
            let layers = m.group_layers();
            assert!(!layers.is_empty(), "{name}");
            // Depthwise kernels pruned alike: at width 0.25 they hold too many of
            // resnet20-ds's grouped weights for the pointwise layers to take the whole 60%.
            assert!(m.pointwise_fraction(0.6, 0.0) >= 0.6);
            m.prune_groups(0.6, 0.6, 0.0, None);
            let (w, z) = m.group_layers().iter().fold((0, 0), |(w, z), g| (w + g.weights, z + g.zero_weights));
            let sp = z as f64 / w as f64;
            assert!((sp - 0.6).abs() < 0.03, "{name} {precision:?}: {sp}");
            let mut r = Rng::new(1);
            let x: Vec<f32> = (0..2 * 1024).map(|_| r.normal()).collect();
            let s = m.train_step(&x, &[1, 2], &Loss::default()).unwrap();
            assert!(s.loss.is_finite(), "{name} {precision:?}");
            let sum = sbdnet_nn::summary::summarize(&m);
            assert_eq!(sum.total.zero_groups, m.group_layers().iter().map(|g| g.zero_groups).sum::<usize>());
            assert!((sum.total.sparsity - sp).abs() < 1e-12);
            assert!(sum.total.additions_removed > 0);
            for l in sum.layers.iter().filter(|l| l.groups > 0) {
                assert_eq!(l.additions + l.additions_removed, l.macs, "{name}: {}", l.name);
                if l.binary_ops > 0 {
                    assert_eq!(l.binary_ops, l.additions, "{name}: {} counts pruned XNORs", l.name);
                }
            }
            if precision == Precision::SW1A1 {
                assert!(
                    sum.layers.iter().any(|l| l.binary_ops > 0 && l.zero_groups > 0),
                    "{name}: {:#?}",
                    sum.layers
                        .iter()
                        .filter(|l| l.groups > 0)
                        .map(|l| (&l.name, l.binary_ops, l.zero_groups, l.groups))
                        .collect::<Vec<_>>()
                );
            }
        }
    }
}

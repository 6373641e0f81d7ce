//! Finite-difference checks of every layer's backward pass, through whole small models so
//! that each layer's input gradient is checked too (the first layer's parameter gradients
//! depend on every later layer's `dx`).

use sbdnet_kernels::rng::Rng;
use sbdnet_nn::{Act, Block, Loss, Model, ModelConfig};

fn loss_at(m: &mut Model, x: &[f32], y: &[u8], loss: &Loss, step: u64) -> f64 {
    m.step = step;
    let logits = m.forward(x, y.len(), true).unwrap().to_vec();
    loss.evaluate(&logits, y, m.config.classes).0 as f64
}

fn check(cfg: ModelConfig, n: usize, seed: u64) {
    check_only(cfg, n, seed, |_| true)
}

fn check_only(cfg: ModelConfig, n: usize, seed: u64, include: impl Fn(&str) -> bool) {
    let mut m = Model::new(cfg.clone(), n, seed).unwrap();
    let mut r = Rng::new(seed + 100);
    let il = cfg.input.iter().product::<usize>();
    let x: Vec<f32> = (0..n * il).map(|_| r.normal()).collect();
    let y: Vec<u8> = (0..n).map(|i| (i % cfg.classes) as u8).collect();
    let loss = Loss { label_smoothing: 0.1 };
    m.step = 5;
    m.train_step(&x, &y, &loss).unwrap();
    let grad = m.params.grad.clone();
    let (mut checked, mut skipped) = (0, 0);
    let mut failures = Vec::new();
    for t in m.params.tensors.clone().into_iter().filter(|t| include(&t.name)) {
        // Up to 6 coordinates per tensor.
        for _ in 0..6.min(t.len()) {
            let i = t.offset + r.below(t.len());
            let orig = m.params.data[i];
            let mut fd_at = |h: f32| {
                m.params.data[i] = orig + h;
                let lp = loss_at(&mut m, &x, &y, &loss, 5);
                m.params.data[i] = orig - h;
                let lm = loss_at(&mut m, &x, &y, &loss, 5);
                m.params.data[i] = orig;
                (lp - lm) / (2.0 * h as f64)
            };
            let (fd, fd_half) = (fd_at(1e-3), fd_at(5e-4));
            checked += 1;
            if (fd - fd_half).abs() > 5e-4 + 1e-2 * fd.abs() {
                // A ReLU / max-pool / hardtanh kink lies within the step: not differentiable
                // here at this resolution, so this coordinate says nothing.
                skipped += 1;
                continue;
            }
            let an = grad[i] as f64;
            if (fd - an).abs() > 2e-3 + 3e-2 * an.abs() {
                failures.push(format!("{}[{}]: analytic {an:.6} vs numeric {fd:.6}", t.name, i - t.offset));
            }
        }
    }
    assert!(skipped * 4 <= checked, "{}: {skipped} of {checked} coordinates sit on kinks", cfg.name);
    assert!(failures.is_empty(), "{} ({}): {failures:#?}", cfg.name, m.nodes.len());
}

fn cfg(name: &str, input: [usize; 3], classes: usize, blocks: Vec<Block>) -> ModelConfig {
    ModelConfig { name: name.into(), input, classes, blocks, quant: Default::default() }
}

#[test]
fn conv_dwsep_bn_relu_gap_linear() {
    let blocks = vec![
        Block::Conv { out: 4, kernel: 3, stride: 1, act: Act::Relu },
        Block::DwSep { out: 6, kernel: 3, stride: 2, act: Act::Relu },
        Block::DwSep { out: 5, kernel: 3, stride: 1, act: Act::None },
        Block::GlobalAvgPool,
        Block::Linear { out: 3, bias: true, act: Act::None, sparse: None },
    ];
    check(cfg("dwsep", [7, 6, 2], 3, blocks), 4, 1);
}

#[test]
fn hardtanh_pools_flatten_dropout() {
    let blocks = vec![
        Block::Conv { out: 3, kernel: 3, stride: 1, act: Act::Hardtanh },
        Block::MaxPool { k: 2, stride: 2 },
        Block::Conv { out: 4, kernel: 1, stride: 1, act: Act::Relu },
        Block::AvgPool { k: 2, stride: 1 },
        Block::Flatten,
        Block::Dropout { p: 0.25 },
        Block::Linear { out: 4, bias: false, act: Act::None, sparse: None },
    ];
    check(cfg("pools", [6, 6, 1], 4, blocks), 3, 2);
}

#[test]
fn residual_with_and_without_projection() {
    let blocks = vec![
        Block::Conv { out: 4, kernel: 3, stride: 1, act: Act::Relu },
        Block::Residual { body: vec![Block::DwSep { out: 4, kernel: 3, stride: 1, act: Act::Relu }], act: Act::Relu },
        Block::Residual {
            body: vec![
                Block::DwSep { out: 6, kernel: 3, stride: 2, act: Act::Relu },
                Block::Conv { out: 6, kernel: 3, stride: 1, act: Act::None },
            ],
            act: Act::None,
        },
        Block::GlobalAvgPool,
        Block::Linear { out: 3, bias: true, act: Act::None, sparse: None },
    ];
    check(cfg("residual", [6, 6, 2], 3, blocks), 3, 3);
}

#[test]
fn presets_small() {
    for name in ["dscnn", "cnn"] {
        check(ModelConfig::preset(name, [8, 8, 1], 10).unwrap(), 2, 4);
    }
}

/// With binary weights the backward pass runs through `Wb`: the gradients of every smooth
/// parameter (batch norm, the float first convolution and classifier) must still match finite
/// differences. (The latent binarized weights use the straight-through estimator, which is
/// not a derivative; `quant.rs` tests it by hand.)
#[test]
fn binary_weight_model_smooth_parameters() {
    let quant = sbdnet_nn::QuantConfig { precision: sbdnet_nn::Precision::W1, ..Default::default() };
    let cfg = ModelConfig::build("dscnn", [8, 8, 1], 10, 0.25, quant).unwrap();
    check_only(cfg, 3, 5, |name| !name.starts_with("block") || name.contains("_bn"));
}

/// A tiny vision transformer (5 tokens of width 8, 2 heads, 2 blocks): patch embedding,
/// LayerNorm, multi-head attention, GELU, residual adds, mean pooling, each layer's backward
/// against finite differences, with dense, DynaDiag (soft phase: values and importance
/// scores) and masked token-wise linear layers (at sparsity 0, so that every weight is on the
/// mask: off the mask the gradient is zero by design, which tests/sparse.rs checks).
#[test]
fn vit_tiny_dims() {
    check_dense_and_sparse(|| ModelConfig::vit([10, 2, 1], 3, 2, 8, 2, 2, 2.0), 6);
}

/// `cfg()` with dense, DynaDiag and masked (at sparsity 0) hidden linear layers.
fn check_dense_and_sparse(cfg: impl Fn() -> ModelConfig, seed: u64) {
    use sbdnet_nn::sparse::{SparseKind, SparseSpec};
    for sparse in [None, Some((SparseKind::Diag, 0.5)), Some((SparseKind::Rigl, 0.0))] {
        let c = cfg().with_hidden_linear(sparse.map(|(k, s)| SparseSpec::new(k, s)));
        assert_eq!(c.has_sparse(), sparse.is_some());
        check(c, 3, seed);
    }
}

/// A tiny MLP-Mixer (5 tokens of width 8, 2 blocks): the per-image transposes of token
/// mixing, LayerNorm, GELU and the four linear layers of each block against finite
/// differences, dense and with DynaDiag (soft phase) and masked linear layers.
#[test]
fn mixer_tiny_dims() {
    check_dense_and_sparse(|| ModelConfig::mixer([10, 2, 1], 3, 2, 8, 2, 2.0, 2.0), 7);
}

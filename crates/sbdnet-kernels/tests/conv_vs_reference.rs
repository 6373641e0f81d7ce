//! Every optimized convolution path against the reference loops, on random shapes
//! (proptest) and named regression cases. Float outputs agree within a relative tolerance of
//! 1e-4 (the optimized paths sum in a different order); depthwise forward is exact.

use proptest::prelude::*;
use sbdnet_kernels::conv::{conv2d_backward, conv2d_forward, ConvAlgo, ConvGeom};
use sbdnet_kernels::reference;
use sbdnet_kernels::rng::Rng;
use sbdnet_kernels::GradMode;

fn rand_vec(r: &mut Rng, n: usize) -> Vec<f32> {
    (0..n).map(|_| r.normal()).collect()
}

fn close(got: &[f32], want: &[f32], what: &str, g: &ConvGeom) {
    let scale = want.iter().fold(1.0f32, |m, v| m.max(v.abs()));
    for (i, (a, b)) in got.iter().zip(want).enumerate() {
        assert!((a - b).abs() <= 1e-4 * scale, "{what} differs at {i}: {a} vs {b} for {g:?}");
    }
}

fn check(g: ConvGeom, seed: u64) {
    let mut r = Rng::new(seed);
    let x = rand_vec(&mut r, g.in_len());
    let w = rand_vec(&mut r, g.weight_len());
    let dy = rand_vec(&mut r, g.out_len());
    let mut want = vec![0.0; g.out_len()];
    reference::conv2d_forward(&g, &x, &w, &mut want);
    let mut col = vec![0.0; g.col_len()];
    let mut scratch = vec![0.0; g.scratch_len(sbdnet_kernels::threads())];
    let mut got = vec![f32::NAN; g.out_len()];
    conv2d_forward(&g, &x, &w, &mut got, &mut col, &mut scratch);
    if g.algo() == ConvAlgo::Depthwise {
        assert_eq!(got, want, "depthwise forward must be exact for {g:?}");
    }
    close(&got, &want, "forward", &g);

    let dx0 = rand_vec(&mut r, g.in_len());
    let dw0 = rand_vec(&mut r, g.weight_len());
    let (mut dx_want, mut dw_want) = (dx0.clone(), dw0.clone());
    reference::conv2d_backward(&g, &x, &w, &dy, &mut dx_want, &mut dw_want);
    let (mut dx, mut dw) = (dx0.clone(), dw0);
    conv2d_backward(&g, &x, &w, &dy, &mut dx, &mut dw, &col, &mut scratch, GradMode::Add);
    close(&dx, &dx_want, "dx", &g);
    close(&dw, &dw_want, "dw", &g);
    // Write mode: dx is overwritten whatever it held.
    let mut dx_fresh = vec![0.0; g.in_len()];
    let mut dw_unused = vec![0.0; g.weight_len()];
    reference::conv2d_backward(&g, &x, &w, &dy, &mut dx_fresh, &mut dw_unused);
    let mut dx = vec![f32::NAN; g.in_len()];
    let mut dw = vec![0.0; g.weight_len()];
    conv2d_backward(&g, &x, &w, &dy, &mut dx, &mut dw, &col, &mut scratch, GradMode::Write);
    close(&dx, &dx_fresh, "dx (write)", &g);
}

#[test]
fn named_cases() {
    // (batch, h, w, cin, cout, k, stride, pad, groups): the dscnn layers at small batch,
    // stride 2 with odd sizes, a channel count that is not a multiple of 8, grouped.
    let cases = [
        (2, 28, 28, 1, 32, 3, 1, 1, 1),
        (2, 28, 28, 32, 32, 3, 1, 1, 32),
        (2, 28, 28, 32, 64, 1, 1, 0, 1),
        (3, 14, 14, 64, 64, 3, 2, 1, 64),
        (1, 7, 7, 13, 13, 3, 2, 1, 13),
        (2, 9, 9, 6, 4, 3, 2, 0, 2),
        (2, 8, 8, 5, 7, 5, 1, 2, 1),
        (1, 3, 3, 4, 4, 3, 1, 0, 4),
        (5, 2, 2, 3, 3, 1, 1, 0, 3),
    ];
    for (i, &(b, h, w, ci, co, k, s, p, gr)) in cases.iter().enumerate() {
        check(ConvGeom::new(b, h, w, ci, co, k, s, p, gr).unwrap(), i as u64);
    }
}

#[test]
fn long_k_weight_gradient() {
    // 1x1 over 64 x 64 x 4 pixels: k = 16384 rows, long enough for the split-k path.
    check(ConvGeom::new(4, 64, 64, 8, 16, 1, 1, 0, 1).unwrap(), 99);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]
    #[test]
    fn random_shapes(
        b in 1usize..4, h in 1usize..12, w in 1usize..12, c in 1usize..20, mult in 1usize..3,
        k in prop::sample::select(vec![1usize, 3, 5]), stride in 1usize..3, pad in 0usize..3,
        kind in 0usize..3, seed in 0u64..1000,
    ) {
        let (cin, cout, groups) = match kind {
            0 => (c, c, c),          // depthwise
            1 => (c, c * mult, 1),   // dense or pointwise
            _ => (2 * c, 2 * mult, 2), // grouped
        };
        if let Some(g) = ConvGeom::new(b, h, w, cin, cout, k, stride, pad.min(k / 2 + 1), groups) {
            check(g, seed);
        }
    }
}

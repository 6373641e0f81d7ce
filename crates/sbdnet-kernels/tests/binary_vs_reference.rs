//! Bit-packed W1A1 kernels against their references, exactly (integers and bits).
//!
//! Three oracles agree: the packed kernels ([`BinaryImpl::Portable`], and `Popcnt` /
//! `Avx2Shuffle` where the CPU has them, plus whatever `SBDNET_KERNEL` selects), the `+-1`
//! reference loops of `binary::reference`, and the float convolution of the training code
//! (`reference::conv2d_forward`) on the unpacked `+-1` values with zero padding, which pins
//! the padding rule to training's. Small integers are exact in f32 (|s| <= 36864 < 2^24).

use proptest::prelude::*;
use sbdnet_kernels::binary::{self, *};
use sbdnet_kernels::conv::ConvGeom;
use sbdnet_kernels::reference;
use sbdnet_kernels::rng::Rng;

const IMPLS: [BinaryImpl; 5] =
    [BinaryImpl::Reference, BinaryImpl::Portable, BinaryImpl::Popcnt, BinaryImpl::Avx2Shuffle, BinaryImpl::Avx512];

fn impls() -> impl Iterator<Item = BinaryImpl> {
    IMPLS.into_iter().filter(|i| i.available())
}

/// Random floats, some exactly zero (sign(0) = +1 must hold).
fn rand_vec(r: &mut Rng, n: usize) -> Vec<f32> {
    (0..n).map(|_| if r.below(16) == 0 { 0.0 } else { r.normal() }).collect()
}

/// `+-1` floats by the weight rule, as the kernels see them after packing.
fn signs(v: &[f32]) -> Vec<f32> {
    v.iter().map(|&x| if x < 0.0 { -1.0 } else { 1.0 }).collect()
}

fn packed(v: &[f32], c: usize) -> Vec<u64> {
    let mut p = vec![u64::MAX; v.len() / c * words(c)];
    pack_signs(v, c, &mut p);
    p
}

fn float_conv(g: &ConvGeom, x: &[f32], w: &[f32]) -> Vec<i32> {
    let mut y = vec![0.0f32; g.out_len()];
    reference::conv2d_forward(g, &signs(x), &signs(w), &mut y);
    y.iter().map(|&v| v as i32).collect()
}

fn check_dense(g: ConvGeom, seed: u64) {
    let mut r = Rng::new(seed);
    let (x, w) = (rand_vec(&mut r, g.in_len()), rand_vec(&mut r, g.weight_len()));
    let xp = packed(&x, g.cin);
    let mut wp = vec![u64::MAX; conv_weight_words(&g)];
    pack_conv_weights(&g, &w, &mut wp);
    let want = float_conv(&g, &x, &w);
    for imp in impls() {
        let mut got = vec![i32::MIN; g.out_len()];
        bconv_forward_with(imp, &g, &xp, &wp, &mut got);
        assert_eq!(got, want, "{imp:?} differs for {g:?}");
    }
    let mut got = vec![i32::MIN; g.out_len()];
    bconv_forward(&g, &xp, &wp, &mut got);
    assert_eq!(got, want, "{:?} (current) differs for {g:?}", BinaryImpl::current());
}

/// Random thresholds around the reachable sums, both signs, and the constant extremes.
fn rand_thresholds(r: &mut Rng, c: usize) -> Vec<SignThreshold> {
    (0..c)
        .map(|_| {
            let thr = match r.below(10) {
                0 => i32::MIN,
                1 => i32::MAX,
                _ => r.below(23) as i32 - 11,
            };
            SignThreshold { thr, negative: r.below(2) == 0 }
        })
        .collect()
}

fn check_depthwise(g: ConvGeom, seed: u64) {
    let mut r = Rng::new(seed);
    let c = g.cin;
    let (x, w) = (rand_vec(&mut r, g.in_len()), rand_vec(&mut r, g.weight_len()));
    let xp = packed(&x, c);
    let mut wp = vec![u64::MAX; dw_weight_words(&g)];
    pack_depthwise_weights(&g, &w, &mut wp);
    let want = float_conv(&g, &x, &w);
    let thr = rand_thresholds(&mut r, c);
    let table = DwThresholds::new(&thr);
    let mut want_bits = vec![u64::MAX; out_words(&g)];
    threshold_pack(&want, c, &thr, &mut want_bits);
    for imp in impls() {
        let mut got = vec![i32::MIN; g.out_len()];
        bdw_forward_with(imp, &g, &xp, &wp, &mut got);
        assert_eq!(got, want, "{imp:?} differs for {g:?}");
        let mut bits = vec![u64::MAX; out_words(&g)];
        bdw_forward_packed_with(imp, &g, &xp, &wp, &table, &mut bits);
        assert_eq!(bits, want_bits, "{imp:?} packed output differs for {g:?}");
    }
    let mut got = vec![i32::MIN; g.out_len()];
    bdw_forward(&g, &xp, &wp, &mut got);
    assert_eq!(got, want);
    // The fused affine (where this CPU runs it) equals the affine applied to the sums.
    let scale: Vec<f32> = (0..c).map(|i| if i % 7 == 0 { -0.5 } else { r.normal() }).collect();
    let bias: Vec<f32> = (0..c).map(|_| r.normal()).collect();
    for act in 0..3u8 {
        let mut y = vec![f32::NAN; g.out_len()];
        let aff = binary::SumAffine { scale: &scale, bias: &bias, act };
        if binary::bdw_forward_affine(&g, &xp, &wp, &aff, &mut y) {
            for (i, (&yv, &s)) in y.iter().zip(&want).enumerate() {
                let t = scale[i % c] * s as f32 + bias[i % c];
                // Hardtanh as max then min (NaN maps to -1, unlike clamp).
                #[allow(clippy::manual_clamp)]
                let e = match act {
                    1 => t.max(0.0),
                    2 => t.max(-1.0).min(1.0),
                    _ => t,
                };
                assert_eq!(yv, e, "fused affine (act {act}) at {i} for {g:?}");
            }
        }
    }
    let mut bits = vec![u64::MAX; out_words(&g)];
    bdw_forward_packed(&g, &xp, &wp, &table, &mut bits);
    assert_eq!(bits, want_bits);
}

#[test]
fn one_hot_bit_order() {
    for c in [1, 2, 63, 64, 65, 127, 128, 130, 200] {
        let wd = words(c);
        assert_eq!(wd, c.div_ceil(64));
        for k in 0..c {
            // Channel k is -1, every other +1: exactly bit k % 64 of word k / 64 is set.
            let x: Vec<f32> = (0..c).map(|i| if i == k { -1.0 } else { 1.0 }).collect();
            let mut p = vec![u64::MAX; wd];
            pack_signs(&x, c, &mut p);
            let mut want = vec![0u64; wd];
            want[k / 64] = 1 << (k % 64);
            assert_eq!(p, want, "pack_signs c={c} k={k}");
            let mut q = vec![u64::MAX; wd];
            pack_thresholded(&x, c, &vec![0.0; c], &mut q);
            assert_eq!(q, want, "pack_thresholded c={c} k={k}");
            let mut back = vec![0.0; c];
            unpack(&p, c, &mut back);
            assert_eq!(back, x);
            assert_eq!(binary::reference::value(&p, wd, 0, k), -1);
        }
        // All -1: every valid bit set, padding bits still 0.
        let mut p = vec![0u64; wd];
        pack_signs(&vec![-1.0; c], c, &mut p);
        for (wi, &v) in p.iter().enumerate() {
            assert_eq!(v, word_mask(c, wi));
        }
        assert_eq!(p[wd - 1].count_ones() as usize, c - 64 * (wd - 1));
    }
}

#[test]
fn thresholded_packing_equals_the_scalar_form() {
    // Whatever implementation `pack_thresholded` dispatches to (AVX-512 here where the CPU
    // has it) equals the one-value-at-a-time form: channel counts around the 16-lane pieces
    // and 64-bit words, several rows, ties, NaN, infinities and signed zeros.
    let mut r = sbdnet_kernels::rng::Rng::new(21);
    for c in [1, 5, 16, 17, 33, 63, 64, 65, 100, 128, 129, 256] {
        let rows = 7;
        let t: Vec<f32> = (0..c).map(|i| if i % 5 == 0 { 0.0 } else { r.normal() }).collect();
        let x: Vec<f32> = (0..rows * c)
            .map(|i| match r.below(9) {
                0 => f32::NAN,
                1 => t[i % c],
                2 => -0.0,
                3 => f32::INFINITY,
                4 => f32::NEG_INFINITY,
                _ => r.normal(),
            })
            .collect();
        let wd = words(c);
        let (mut got, mut want) = (vec![u64::MAX; rows * wd], vec![0u64; rows * wd]);
        pack_thresholded(&x, c, &t, &mut got);
        binary::pack_thresholded_scalar(&x, c, &t, &mut want);
        assert_eq!(got, want, "c={c}");
    }
}

#[test]
fn packing_rules_at_zero_ties_and_nan() {
    // Weights: sign(0) = +1 (also -0.0); activations: +1 iff x > t, so x == t is -1.
    let x = [0.0, -0.0, 1e-30, -1e-30, f32::NAN, 2.0];
    let mut p = [u64::MAX];
    pack_signs(&x, 6, &mut p);
    assert_eq!(p[0], 0b001000);
    let t = [0.0, 0.0, 1e-30, 0.0, 0.0, 2.0];
    pack_thresholded(&x, 6, &t, &mut p);
    // Every channel sits at or below its threshold (or is NaN): all -1.
    assert_eq!(p[0], 0b111111);
    let t = [-1.0; 6];
    pack_thresholded(&x, 6, &t, &mut p);
    assert_eq!(p[0], 0b010000, "only NaN fails x > -1");
}

#[test]
fn dense_named_cases() {
    // (batch, h, w, cin, cout, k, stride, pad): dscnn-like layers and awkward sizes.
    let cases = [
        (1, 14, 14, 128, 128, 1, 1, 0),
        (1, 7, 7, 130, 9, 3, 1, 1),
        (2, 5, 6, 64, 5, 3, 2, 1),
        (1, 3, 3, 1, 1, 3, 1, 1),
        (1, 1, 1, 200, 7, 3, 1, 1),
        (1, 3, 9, 65, 4, 3, 2, 0),
        (1, 6, 6, 3, 8, 1, 2, 1),
    ];
    for (i, &(b, h, w, ci, co, k, s, p)) in cases.iter().enumerate() {
        check_dense(ConvGeom::new(b, h, w, ci, co, k, s, p, 1).unwrap(), i as u64);
    }
}

#[test]
fn depthwise_named_cases() {
    // (batch, h, w, c, stride, pad): dscnn/mobilenet-like layers (runs of four interior
    // pixels and the single-pixel borders), channel counts off multiples of 64.
    let cases = [
        (1, 28, 28, 64, 1, 1),
        (1, 28, 28, 64, 2, 1),
        (2, 14, 14, 130, 2, 0),
        (1, 12, 12, 200, 1, 0),
        (1, 16, 5, 1, 1, 1),
        (3, 9, 13, 127, 2, 1),
    ];
    for (i, &(b, h, w, c, s, p)) in cases.iter().enumerate() {
        check_depthwise(ConvGeom::new(b, h, w, c, c, 3, s, p, c).unwrap(), 100 + i as u64);
    }
}

#[test]
fn every_border() {
    // Every image size up to 7x7 with k = 3, both strides and paddings: each output pixel
    // meets a different set of padded taps (corners, edges, 1-pixel images).
    let mut seed = 0;
    for h in 1..=7 {
        for w in 1..=7 {
            for stride in 1..=2 {
                for pad in 0..=1 {
                    seed += 1;
                    if let Some(g) = ConvGeom::new(1, h, w, 65, 5, 3, stride, pad, 1) {
                        check_dense(g, seed);
                    }
                    if let Some(g) = ConvGeom::new(1, h, w, 65, 65, 3, stride, pad, 65) {
                        check_depthwise(g, seed);
                    }
                }
            }
        }
    }
}

#[test]
fn accumulator_does_not_overflow() {
    // 4096 channels x 3x3: |s| up to 36864 per output.
    let g = ConvGeom::new(1, 4, 4, 4096, 6, 3, 1, 1, 1).unwrap();
    check_dense(g, 7);
    let xp = packed(&vec![1.0; g.in_len()], g.cin);
    for (wv, sign) in [(1.0f32, 1), (-1.0, -1)] {
        let mut wp = vec![0u64; conv_weight_words(&g)];
        pack_conv_weights(&g, &vec![wv; g.weight_len()], &mut wp);
        for imp in impls() {
            let mut y = vec![0i32; g.out_len()];
            bconv_forward_with(imp, &g, &xp, &wp, &mut y);
            // Interior pixels see 9 taps, edges 6, corners 4.
            let at = |oy: usize, ox: usize| y[(oy * 4 + ox) * 6];
            assert_eq!(at(1, 1), sign * 36864, "{imp:?}");
            assert_eq!(at(0, 1), sign * 4096 * 6, "{imp:?}");
            assert_eq!(at(0, 0), sign * 4096 * 4, "{imp:?}");
        }
    }
    // Depthwise: a wide layer (bit-sliced counters per lane hold at most 9).
    check_depthwise(ConvGeom::new(1, 5, 5, 4096, 4096, 3, 1, 1, 4096).unwrap(), 8);
}

/// Float BatchNorm + sign of the training graph, in f32 as training computes it.
fn float_bn_sign(s: i32, alpha: f32, gamma: f32, beta: f32, mean: f32, sigma: f32, t: f32) -> (bool, f32) {
    let y = gamma * (alpha * s as f32 - mean) / sigma + beta;
    // Bit 1 (-1) unless y > t, NaN included.
    (y.partial_cmp(&t) != Some(std::cmp::Ordering::Greater), y - t)
}

#[test]
fn threshold_fold_matches_float_bn_sign() {
    let mut r = Rng::new(5);
    let mut checked = 0usize;
    for case in 0..2000 {
        let alpha = if case % 97 == 0 { 0.0 } else { r.uniform() * 0.5 + 0.01 };
        let gamma = match case % 5 {
            0 => 0.0,
            1 | 2 => -(r.uniform() * 2.0 + 1e-3),
            _ => r.uniform() * 2.0 + 1e-3,
        };
        let (beta, mean, t) = (r.normal(), r.normal() * 3.0, r.normal() * 0.5);
        let sigma = r.uniform() * 2.0 + 0.05;
        let st = fold_bn_sign(alpha, gamma, beta, mean, sigma, t);
        if gamma == 0.0 || alpha == 0.0 {
            // Constant output: y = beta - gamma * mean / sigma (= beta when gamma == 0).
            let b = beta - gamma * mean / sigma;
            let want_thr = if b > t { i32::MIN } else { i32::MAX };
            assert_eq!(st, SignThreshold { thr: want_thr, negative: false });
        }
        assert_eq!(st.negative, gamma * alpha < 0.0);
        for s in -300..=300 {
            let (want, margin) = float_bn_sign(s, alpha, gamma, beta, mean, sigma, t);
            // Within float rounding of an exact tie, training's own f32 rounding decides.
            if margin.abs() < 1e-4 * (1.0 + t.abs() + beta.abs()) {
                continue;
            }
            assert_eq!(
                st.bit(s),
                want,
                "s={s} alpha={alpha} gamma={gamma} beta={beta} mean={mean} sigma={sigma} t={t}"
            );
            checked += 1;
        }
    }
    assert!(checked > 1_000_000, "{checked}");
    // The extremes: always +1 / always -1 for every reachable sum.
    assert!(!fold_bn_sign(0.1, 0.0, 1.0, 0.0, 1.0, 0.5).bit(-36864));
    assert!(fold_bn_sign(0.1, 0.0, 0.0, 0.0, 1.0, 0.5).bit(36864));
    assert!(fold_bn_sign(0.1, 0.0, 0.5, 0.0, 1.0, 0.5).bit(0), "beta == t: y > t is false");
}

#[test]
fn fused_depthwise_equals_float_bn_sign() {
    // End to end: packed depthwise + folded thresholds == float conv + BN + sign, channel by
    // channel, with negative and zero gammas (ties excluded by construction: margins > 1e-3).
    let g = ConvGeom::new(1, 9, 8, 100, 100, 3, 2, 1, 100).unwrap();
    let mut r = Rng::new(3);
    let (x, w) = (rand_vec(&mut r, g.in_len()), rand_vec(&mut r, g.weight_len()));
    let s = float_conv(&g, &x, &w);
    let params: Vec<[f32; 5]> = (0..100)
        .map(|ch| {
            let gamma = [0.0, -1.3, 0.7][ch % 3] * (1.0 + r.uniform());
            [gamma, r.normal(), (r.below(9) as f32) - 4.5, 1.0 + r.uniform(), r.normal() * 0.1]
        })
        .collect();
    let alpha = 0.25f32;
    let thr: Vec<SignThreshold> =
        params.iter().map(|&[gm, b, m, sg, t]| fold_bn_sign(alpha, gm, b, m, sg, t)).collect();
    let xp = packed(&x, 100);
    let mut wp = vec![0u64; dw_weight_words(&g)];
    pack_depthwise_weights(&g, &w, &mut wp);
    let table = DwThresholds::new(&thr);
    for imp in impls() {
        let mut bits = vec![0u64; out_words(&g)];
        bdw_forward_packed_with(imp, &g, &xp, &wp, &table, &mut bits);
        let mut got = vec![0.0f32; g.out_len()];
        unpack(&bits, 100, &mut got);
        for (i, (&sv, &gv)) in s.iter().zip(&got).enumerate() {
            let [gm, b, m, sg, t] = params[i % 100];
            let (bit, margin) = float_bn_sign(sv, alpha, gm, b, m, sg, t);
            if margin.abs() > 1e-3 {
                assert_eq!(gv, if bit { -1.0 } else { 1.0 }, "{imp:?} at {i}, s={sv}");
            }
        }
        for px in bits.chunks(2) {
            assert_eq!(px[1] & !word_mask(100, 1), 0, "padding bits must be 0");
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]
    #[test]
    fn dense_random_shapes(
        b in 1usize..3, h in 1usize..12, w in 1usize..12, cin in 1usize..200, cout in 1usize..12,
        k in prop::sample::select(vec![1usize, 3]), stride in 1usize..3, pad in 0usize..2, seed in 0u64..1000,
    ) {
        if let Some(g) = ConvGeom::new(b, h, w, cin, cout, k, stride, pad, 1) {
            check_dense(g, seed);
        }
    }

    #[test]
    fn depthwise_random_shapes(
        b in 1usize..3, h in 1usize..12, w in 1usize..12, c in 1usize..200,
        stride in 1usize..3, pad in 0usize..2, seed in 0u64..1000,
    ) {
        if let Some(g) = ConvGeom::new(b, h, w, c, c, 3, stride, pad, c) {
            check_depthwise(g, seed);
        }
    }
}

mod timing {
    //! `cargo test --release -p sbdnet-kernels --test binary_vs_reference -- --ignored --nocapture`
    use super::*;
    use std::hint::black_box;
    use std::time::Instant;

    fn median_secs(reps: usize, mut f: impl FnMut()) -> f64 {
        for _ in 0..reps.div_ceil(10) {
            f();
        }
        let mut t: Vec<f64> = (0..reps)
            .map(|_| {
                let s = Instant::now();
                f();
                s.elapsed().as_secs_f64()
            })
            .collect();
        t.sort_by(f64::total_cmp);
        t[reps / 2]
    }

    /// Peak of XOR + POPCNT on an L1-resident buffer (4 independent accumulators): binary
    /// MACs per second = 64 bits per popcount.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "popcnt")]
    fn popcnt_peak(a: &[u64], b: &[u64], rounds: usize) -> u64 {
        let mut acc = [0u64; 4];
        for _ in 0..rounds {
            // Opaque per round, so the compiler cannot hoist the invariant sum.
            let (a, b) = (black_box(a), black_box(b));
            for (x, y) in a.chunks_exact(4).zip(b.chunks_exact(4)) {
                for i in 0..4 {
                    acc[i] += u64::from((x[i] ^ y[i]).count_ones());
                }
            }
            black_box(&acc);
        }
        acc.iter().sum()
    }

    #[test]
    #[ignore = "timing, not a test: run with --ignored --nocapture"]
    fn binary_ops_per_second() {
        let pool = rayon::ThreadPoolBuilder::new().num_threads(1).build().unwrap();
        pool.install(|| {
            let mut r = Rng::new(1);
            #[cfg(target_arch = "x86_64")]
            if BinaryImpl::Popcnt.available() {
                let (a, b): (Vec<u64>, Vec<u64>) = (0..1024).map(|_| (r.next_u64(), r.next_u64())).unzip();
                let rounds = 2000;
                // SAFETY: popcnt is available.
                let t = median_secs(15, || {
                    black_box(unsafe { popcnt_peak(black_box(&a), black_box(&b), rounds) });
                });
                let macs = (1024 * 64 * rounds) as f64;
                println!("limit: XOR+POPCNT peak (1 thread, L1) {:.1} G binary MACs/s", macs / t / 1e9);
            }
            // dscnn-like pointwise: 14x14x128 -> 128, 1x1.
            let g = ConvGeom::new(1, 14, 14, 128, 128, 1, 1, 0, 1).unwrap();
            let xp: Vec<u64> = (0..in_words(&g)).map(|_| r.next_u64()).collect();
            let wp: Vec<u64> = (0..conv_weight_words(&g)).map(|_| r.next_u64()).collect();
            let macs = (g.out_rows() * g.cout * g.cin) as f64;
            let mut y = vec![0i32; g.out_len()];
            for imp in impls() {
                let reps = if imp == BinaryImpl::Reference { 3 } else { 400 };
                let t = median_secs(reps, || bconv_forward_with(imp, &g, &xp, &wp, &mut y));
                println!("bconv 1x1 14x14x128->128 {imp:?}: {:.1} us, {:.1} G binary MACs/s", t * 1e6, macs / t / 1e9);
            }
            // Dense 3x3 (for the run-length comparison): 14x14x128 -> 128.
            let g = ConvGeom::new(1, 14, 14, 128, 128, 3, 1, 1, 1).unwrap();
            let wp: Vec<u64> = (0..conv_weight_words(&g)).map(|_| r.next_u64()).collect();
            let macs = (g.out_rows() * g.cout * g.cin * 9) as f64;
            for imp in impls().filter(|&i| i != BinaryImpl::Reference) {
                let t = median_secs(100, || bconv_forward_with(imp, &g, &xp, &wp, &mut y));
                println!("bconv 3x3 14x14x128->128 {imp:?}: {:.1} us, {:.1} G binary MACs/s", t * 1e6, macs / t / 1e9);
            }
            // dscnn-like depthwise: 28x28x64, 3x3, stride 1, pad 1.
            let g = ConvGeom::new(1, 28, 28, 64, 64, 3, 1, 1, 64).unwrap();
            let xp: Vec<u64> = (0..in_words(&g)).map(|_| r.next_u64()).collect();
            let wp: Vec<u64> = (0..dw_weight_words(&g)).map(|_| r.next_u64()).collect();
            let thr = DwThresholds::new(&rand_thresholds(&mut r, 64));
            let macs = (g.out_rows() * g.cin * 9) as f64;
            let mut y = vec![0i32; g.out_len()];
            let mut bits = vec![0u64; out_words(&g)];
            for imp in impls() {
                let reps = if imp == BinaryImpl::Reference { 3 } else { 400 };
                let t = median_secs(reps, || bdw_forward_with(imp, &g, &xp, &wp, &mut y));
                println!("bdw 3x3 28x28x64 i32 {imp:?}: {:.1} us, {:.1} G binary MACs/s", t * 1e6, macs / t / 1e9);
                let t = median_secs(reps, || bdw_forward_packed_with(imp, &g, &xp, &wp, &thr, &mut bits));
                println!("bdw 3x3 28x28x64 packed {imp:?}: {:.1} us, {:.1} G binary MACs/s", t * 1e6, macs / t / 1e9);
            }
        });
    }
}

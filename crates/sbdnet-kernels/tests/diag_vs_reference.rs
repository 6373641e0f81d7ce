//! Diagonal-sparse and CSR kernels against their reference loops and against dense products.
//!
//! Tolerances: the optimized diagonal kernels and the CSR input/value gradients add the same
//! terms in the same order as the reference loops. On the portable path (and for
//! `SBDNET_KERNEL=reference`) they multiply, then add, so they must match bit for bit for every
//! thread count. The AVX2 blocked diagonal kernels fuse multiply-add, and comparisons with a
//! dense product (which sums in another order), the CSR single-row forward (4 partial sums) and
//! finite differences use a relative tolerance: `|got - want| <= 1e-5 * sum_i |term_i|` (plus a
//! tiny absolute floor), where the sum of absolute terms bounds the rounding of any summation
//! order.

use proptest::prelude::*;
use sbdnet_kernels::csr::{self, CsrMatrix};
use sbdnet_kernels::diag::{self, DiagMatrix};
use sbdnet_kernels::reference::matmul as refmm;
use sbdnet_kernels::rng::Rng;
use sbdnet_kernels::{kernel_path, KernelPath};

fn rand_vec(r: &mut Rng, n: usize) -> Vec<f32> {
    (0..n).map(|_| r.normal()).collect()
}

fn pool(threads: usize) -> rayon::ThreadPool {
    rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap()
}

fn assert_bits(got: &[f32], want: &[f32], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: lengths");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!(g.to_bits() == w.to_bits(), "{what}[{i}]: {g} != {w} (bitwise)");
    }
}

/// `|got - want| <= 1e-5 * scale + 1e-6` element-wise, `scale` the sum of absolute terms.
fn assert_close(got: &[f32], want: &[f32], scale: &[f32], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: lengths");
    for (i, ((g, w), s)) in got.iter().zip(want).zip(scale).enumerate() {
        assert!((g - w).abs() <= 1e-5 * s + 1e-6, "{what}[{i}]: {g} vs {w} (scale {s})");
    }
}

/// Bitwise on the exact paths, within tolerance on the (fused) AVX2 path.
fn assert_diag(got: &[f32], want: &[f32], scale: &[f32], what: &str) {
    if kernel_path() == KernelPath::Avx2 {
        assert_close(got, want, scale, what)
    } else {
        assert_bits(got, want, what)
    }
}

fn abs(v: &[f32]) -> Vec<f32> {
    v.iter().map(|x| x.abs()).collect()
}

/// `Y = X W^T` densely (reference matmul) and the matching sum of |terms|.
fn dense_forward(m: usize, n: usize, w: &[f32], x: &[f32], batch: usize) -> (Vec<f32>, Vec<f32>) {
    let mut y = vec![0.0; batch * m];
    refmm(batch, m, n, x, false, w, true, &mut y, false);
    let wa: Vec<f32> = w.iter().map(|v| v.abs()).collect();
    let xa: Vec<f32> = x.iter().map(|v| v.abs()).collect();
    let mut s = vec![0.0; batch * m];
    refmm(batch, m, n, &xa, false, &wa, true, &mut s, false);
    (y, s)
}

/// Every diagonal kernel: optimized == reference (bitwise where unfused; 1, 2 and 3 threads), forward ==
/// dense product within tolerance, structural invariants.
fn check_diag(m: usize, n: usize, s: f64, batch: usize, seed: u64) {
    let mut r = Rng::new(seed);
    let w = DiagMatrix::from_sparsity(m, n, s, &mut r).unwrap();
    let (d, p) = (m.min(n), m.max(n));
    let k = DiagMatrix::active_diagonals(m, n, s);
    assert!((1..=p).contains(&k));
    assert_eq!(w.num_diagonals(), k);
    assert_eq!(w.nnz(), k * d);
    let mut offs = w.offsets().to_vec();
    offs.sort_unstable();
    offs.dedup();
    assert_eq!(offs.len(), k, "offsets distinct");
    assert!(offs.iter().all(|&o| o < p));
    let dense = w.to_dense();
    assert_eq!(dense.iter().filter(|v| **v != 0.0).count(), w.values().iter().filter(|v| **v != 0.0).count());
    assert_eq!(w.mask().iter().filter(|v| **v != 0.0).count(), k * d, "distinct diagonals never overlap");

    let x = rand_vec(&mut r, batch * n);
    let dy = rand_vec(&mut r, batch * m);
    let dx0 = rand_vec(&mut r, batch * n);
    let dv0 = rand_vec(&mut r, k * d);

    let mut y_ref = vec![f32::NAN; batch * m];
    diag::reference_forward(&w, &x, batch, &mut y_ref);
    let (y_dense, scale) = dense_forward(m, n, &dense, &x, batch);
    assert_close(&y_ref, &y_dense, &scale, "reference forward vs dense");
    let mut dx_ref_w = vec![f32::NAN; batch * n];
    diag::reference_backward_input(&w, &dy, batch, &mut dx_ref_w, false);
    let mut dx_ref_a = dx0.clone();
    diag::reference_backward_input(&w, &dy, batch, &mut dx_ref_a, true);
    let mut dv_ref = dv0.clone();
    diag::reference_backward_values(&w, &x, &dy, batch, &mut dv_ref);

    // Sums of absolute terms (the reference kernels on |W|, |x|, |dy|) for the tolerance.
    let wa = DiagMatrix::new(m, n, w.offsets().to_vec(), abs(w.values())).unwrap();
    let (xa, dya) = (abs(&x), abs(&dy));
    let mut y_s = vec![0.0; batch * m];
    diag::reference_forward(&wa, &xa, batch, &mut y_s);
    let mut dx_s = vec![0.0; batch * n];
    diag::reference_backward_input(&wa, &dya, batch, &mut dx_s, false);
    let mut dxa_s = abs(&dx0);
    diag::reference_backward_input(&wa, &dya, batch, &mut dxa_s, true);
    let mut dv_s = abs(&dv0);
    diag::reference_backward_values(&wa, &xa, &dya, batch, &mut dv_s);

    for threads in [1, 2, 3] {
        pool(threads).install(|| {
            let mut y = vec![f32::NAN; batch * m];
            w.forward(&x, batch, &mut y);
            assert_diag(&y, &y_ref, &y_s, &format!("forward {m}x{n} s={s} b={batch} t={threads}"));
            let mut dx = vec![f32::NAN; batch * n];
            w.backward_input(&dy, batch, &mut dx, false);
            assert_diag(&dx, &dx_ref_w, &dx_s, &format!("dx write {m}x{n} t={threads}"));
            let mut dx = dx0.clone();
            w.backward_input(&dy, batch, &mut dx, true);
            assert_diag(&dx, &dx_ref_a, &dxa_s, &format!("dx add {m}x{n} t={threads}"));
            let mut dv = dv0.clone();
            w.backward_values(&x, &dy, batch, &mut dv);
            assert_diag(&dv, &dv_ref, &dv_s, &format!("dv {m}x{n} t={threads}"));
        });
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(96))]

    #[test]
    fn diag_matches_reference(m in 1usize..80, n in 1usize..80, s in 0.0f64..0.99, batch in 1usize..9, seed in 0u64..1000) {
        check_diag(m, n, s, batch, seed);
    }

    #[test]
    fn csr_matches_reference_and_dense(m in 1usize..80, n in 1usize..80, s in 0.0f64..0.99, batch in 1usize..9, seed in 0u64..1000) {
        check_csr(m, n, s, batch, seed);
    }
}

#[test]
fn named_tall_fc1_small_batch() {
    check_diag(3072, 768, 0.9, 3, 11);
}

#[test]
fn named_wide_fc2_small_batch() {
    check_diag(768, 3072, 0.9, 2, 12);
}

#[test]
fn named_qkv_batch_tiles() {
    check_diag(2304, 768, 0.9, 9, 13);
}

#[test]
fn named_few_diagonals_split_over_j() {
    // K = 1 < threads: the value gradient splits one diagonal over j ranges.
    check_diag(512, 384, 0.999, 7, 14);
    check_diag(384, 512, 0.999, 1, 15);
}

#[test]
fn named_dense_when_k_equals_p() {
    for (m, n) in [(64, 48), (48, 64), (37, 37), (1, 9), (9, 1)] {
        let mut r = Rng::new(5);
        let w = DiagMatrix::from_sparsity(m, n, 0.0, &mut r).unwrap();
        assert_eq!(w.num_diagonals(), m.max(n));
        assert_eq!(w.nnz(), m * n);
        assert!(w.mask().iter().all(|&v| v == 1.0), "K == P covers every entry");
        check_diag(m, n, 0.0, 5, 21);
    }
}

#[test]
fn active_diagonals_formula() {
    assert_eq!(DiagMatrix::active_diagonals(3072, 768, 0.9), 308); // ceil(0.1 * 3072) = ceil(307.2)
    assert_eq!(DiagMatrix::active_diagonals(768, 3072, 0.9), 308);
    assert_eq!(DiagMatrix::active_diagonals(1000, 10, 0.9), 100); // exact: no spurious +1
    assert_eq!(DiagMatrix::active_diagonals(1000, 10, 0.9f32 as f64), 100);
    assert_eq!(DiagMatrix::active_diagonals(10, 10, 0.999), 1);
    assert_eq!(DiagMatrix::active_diagonals(10, 10, 0.0), 10);
}

#[test]
fn pattern_pins_tall_and_wide() {
    // Tall 4x2, offset 3: (row (j+3) mod 4, col j) = (3,0), (0,1).
    let w = DiagMatrix::new(4, 2, vec![3], vec![1.0, 2.0]).unwrap();
    assert_eq!(w.to_dense(), vec![0.0, 2.0, 0.0, 0.0, 0.0, 0.0, 1.0, 0.0]);
    // Wide 2x4, offset 3: (row j, col (j+3) mod 4) = (0,3), (1,0).
    let w = DiagMatrix::new(2, 4, vec![3], vec![1.0, 2.0]).unwrap();
    assert_eq!(w.to_dense(), vec![0.0, 0.0, 0.0, 1.0, 2.0, 0.0, 0.0, 0.0]);
}

#[test]
fn constructor_validates() {
    use sbdnet_kernels::diag::DiagError;
    assert_eq!(DiagMatrix::new(0, 3, vec![0], vec![]).unwrap_err(), DiagError::EmptyShape { m: 0, n: 3 });
    assert!(matches!(DiagMatrix::new(3, 2, vec![], vec![]), Err(DiagError::DiagonalCount { .. })));
    assert!(matches!(DiagMatrix::new(3, 2, vec![3], vec![0.0; 2]), Err(DiagError::OffsetOutOfRange { .. })));
    assert!(matches!(DiagMatrix::new(3, 2, vec![1, 1], vec![0.0; 4]), Err(DiagError::DuplicateOffset { .. })));
    assert!(matches!(DiagMatrix::new(3, 2, vec![1], vec![0.0; 3]), Err(DiagError::ValuesLength { .. })));
    let mut r = Rng::new(1);
    assert!(matches!(DiagMatrix::from_sparsity(3, 2, 1.0, &mut r), Err(DiagError::Sparsity { .. })));
    assert!(matches!(DiagMatrix::from_sparsity(3, 2, f64::NAN, &mut r), Err(DiagError::Sparsity { .. })));
}

/// Scalar loss `L = sum(Y * R)`: `dL/dX = R W` and `dL/dV` from the kernels against central
/// differences (L is linear in X and V, so the difference quotient is exact up to rounding).
fn finite_difference(m: usize, n: usize, s: f64, batch: usize) {
    let mut r = Rng::new(99);
    let mut w = DiagMatrix::from_sparsity(m, n, s, &mut r).unwrap();
    let mut x = rand_vec(&mut r, batch * n);
    let rr = rand_vec(&mut r, batch * m);
    let loss = |w: &DiagMatrix, x: &[f32]| -> f64 {
        let mut y = vec![0.0; batch * m];
        w.forward(x, batch, &mut y);
        y.iter().zip(&rr).map(|(&y, &r)| y as f64 * r as f64).sum()
    };
    let mut dx = vec![0.0; batch * n];
    w.backward_input(&rr, batch, &mut dx, false);
    let mut dv = vec![0.0; w.nnz()];
    w.backward_values(&x, &rr, batch, &mut dv);
    let eps = 1e-2f32;
    let tol = |g: f32, fd: f64| (g as f64 - fd).abs() <= 2e-3 * (1.0 + fd.abs());
    for t in 0..20 {
        let i = r.below(x.len());
        let old = x[i];
        x[i] = old + eps;
        let lp = loss(&w, &x);
        x[i] = old - eps;
        let lm = loss(&w, &x);
        x[i] = old;
        let fd = (lp - lm) / (2.0 * eps as f64);
        assert!(tol(dx[i], fd), "dX[{i}] {} vs fd {fd} (probe {t})", dx[i]);
        let q = r.below(w.nnz());
        let old = w.values()[q];
        w.values_mut()[q] = old + eps;
        let lp = loss(&w, &x);
        w.values_mut()[q] = old - eps;
        let lm = loss(&w, &x);
        w.values_mut()[q] = old;
        let fd = (lp - lm) / (2.0 * eps as f64);
        assert!(tol(dv[q], fd), "dV[{q}] {} vs fd {fd} (probe {t})", dv[q]);
    }
}

#[test]
fn finite_difference_tall_wide_square() {
    finite_difference(40, 24, 0.7, 5);
    finite_difference(24, 40, 0.7, 5);
    finite_difference(32, 32, 0.5, 3);
    finite_difference(300, 96, 0.9, 2);
}

fn check_csr(m: usize, n: usize, s: f64, batch: usize, seed: u64) {
    let mut r = Rng::new(seed);
    let c = CsrMatrix::random(m, n, s, &mut r).unwrap();
    let dense = c.to_dense();
    let x = rand_vec(&mut r, batch * n);
    let dy = rand_vec(&mut r, batch * m);
    let dx0 = rand_vec(&mut r, batch * n);
    let dv0 = rand_vec(&mut r, c.nnz());
    let (y_dense, scale) = dense_forward(m, n, &dense, &x, batch);
    let mut y_ref = vec![f32::NAN; batch * m];
    csr::reference_forward(&c, &x, batch, &mut y_ref);
    assert_close(&y_ref, &y_dense, &scale, "csr reference vs dense");
    // Dense input gradient dX = dY W and its |terms|.
    let mut dx_dense = dx0.clone();
    refmm(batch, n, m, &dy, false, &dense, false, &mut dx_dense, true);
    let mut dx_scale = dx0.iter().map(|v| v.abs()).collect::<Vec<_>>();
    let (dya, wa): (Vec<f32>, Vec<f32>) =
        (dy.iter().map(|v| v.abs()).collect(), dense.iter().map(|v| v.abs()).collect());
    refmm(batch, n, m, &dya, false, &wa, false, &mut dx_scale, true);
    let mut dx_ref = dx0.clone();
    csr::reference_backward_input(&c, &dy, batch, &mut dx_ref, true);
    assert_close(&dx_ref, &dx_dense, &dx_scale, "csr reference dx vs dense");
    let mut dv_ref = dv0.clone();
    csr::reference_backward_values(&c, &x, &dy, batch, &mut dv_ref);
    // Dense weight gradient dW = dY^T X, read at the stored entries.
    let mut dw = vec![0.0; m * n];
    refmm(m, n, batch, &dy, true, &x, false, &mut dw, false);
    let mut p = 0;
    for i in 0..m {
        for &col in &c.col_idx()[c.row_ptr()[i]..c.row_ptr()[i + 1]] {
            let want = dv0[p] + dw[i * n + col as usize];
            assert!((dv_ref[p] - want).abs() <= 1e-4 * (1.0 + want.abs()), "csr dv[{p}]");
            p += 1;
        }
    }
    for threads in [1, 2, 3] {
        pool(threads).install(|| {
            let mut y = vec![f32::NAN; batch * m];
            c.forward(&x, batch, &mut y);
            assert_close(&y, &y_ref, &scale, &format!("csr forward t={threads}"));
            let mut dx = dx0.clone();
            c.backward_input(&dy, batch, &mut dx, true);
            assert_bits(&dx, &dx_ref, "csr dx add");
            let mut dxw = vec![f32::NAN; batch * n];
            c.backward_input(&dy, batch, &mut dxw, false);
            let mut want = vec![0.0; batch * n];
            csr::reference_backward_input(&c, &dy, batch, &mut want, false);
            assert_bits(&dxw, &want, "csr dx write");
            let mut dv = dv0.clone();
            c.backward_values(&x, &dy, batch, &mut dv);
            assert_bits(&dv, &dv_ref, "csr dv");
        });
    }
}

#[test]
fn named_csr_large() {
    check_csr(3072, 768, 0.9, 9, 3);
    check_csr(768, 3072, 0.9, 2, 4);
}

#[test]
fn csr_random_with_nnz_is_exact_and_matches_diag_count() {
    let mut r = Rng::new(8);
    for (m, n, s) in [(3072, 768, 0.9), (768, 3072, 0.9), (2304, 768, 0.9), (17, 5, 0.5)] {
        let w = DiagMatrix::from_sparsity(m, n, s, &mut r).unwrap();
        let c = CsrMatrix::random_with_nnz(m, n, w.nnz(), &mut r).unwrap();
        assert_eq!(c.nnz(), w.nnz());
        assert_eq!(c.row_ptr().len(), m + 1);
        assert_eq!(c.mask().iter().filter(|v| **v != 0.0).count(), w.nnz(), "positions distinct");
    }
    assert!(CsrMatrix::random_with_nnz(2, 2, 5, &mut r).is_err());
    assert!(CsrMatrix::random(2, 2, 1.0, &mut r).is_err());
}

#[test]
fn diag_as_csr_and_masked_dense_agree() {
    let mut r = Rng::new(31);
    for (m, n, batch) in [(96, 40, 6), (40, 96, 1), (64, 64, 17)] {
        let w = DiagMatrix::from_sparsity(m, n, 0.8, &mut r).unwrap();
        let (dense, mask) = (w.to_dense(), w.mask());
        let c = CsrMatrix::from_dense_mask(m, n, &dense, &mask).unwrap();
        assert_eq!(c.nnz(), w.nnz());
        let x = rand_vec(&mut r, batch * n);
        let dy = rand_vec(&mut r, batch * m);
        let (_, scale) = dense_forward(m, n, &dense, &x, batch);
        let mut yd = vec![0.0; batch * m];
        w.forward(&x, batch, &mut yd);
        let mut yc = vec![0.0; batch * m];
        c.forward(&x, batch, &mut yc);
        assert_close(&yc, &yd, &scale, "csr vs diag forward");
        let mut ym = vec![0.0; batch * m];
        csr::dense_forward(m, n, &dense, &x, batch, &mut ym, 2);
        assert_close(&ym, &yd, &scale, "masked dense vs diag forward");
        // Masked dense weight gradient: zero outside the mask, the diag value gradient inside.
        let mut dw = vec![1.0; m * n];
        csr::dense_backward_weight(m, n, &x, &dy, batch, &mut dw, false, Some(&mask), 1);
        let mut dv = vec![0.0; w.nnz()];
        w.backward_values(&x, &dy, batch, &mut dv);
        let d = w.diag_len();
        for k in 0..w.num_diagonals() {
            for j in 0..d {
                let (row, col) = w.position(k, j);
                let (g, want) = (dw[row * n + col], dv[k * d + j]);
                assert!((g - want).abs() <= 1e-4 * (1.0 + want.abs()), "masked dW vs diag dV");
            }
        }
        let off: f32 = dw.iter().zip(&mask).filter(|(_, &k)| k == 0.0).map(|(v, _)| v.abs()).sum();
        assert_eq!(off, 0.0, "masked dW is zero outside the pattern");
        // Dense input gradient equals the diagonal one.
        let mut dxm = vec![0.0; batch * n];
        csr::dense_backward_input(m, n, &dense, &dy, batch, &mut dxm, false, 1);
        let mut dxd = vec![0.0; batch * n];
        w.backward_input(&dy, batch, &mut dxd, false);
        for (a, b) in dxm.iter().zip(&dxd) {
            assert!((a - b).abs() <= 1e-4 * (1.0 + b.abs()), "masked dense dX vs diag dX");
        }
    }
}

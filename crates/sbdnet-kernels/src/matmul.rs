//! Row-major single-precision matrix products through the `gemm` crate.
//!
//! `C[m x n] (+)= op(A)[m x k] * op(B)[k x n]`, where `op` is identity or transpose; a
//! transpose is only a change of strides. [`sgemm_tn_split_k`] is for the weight-gradient shape
//! (small `m x n`, very long `k`), which `gemm` does not split across threads: it gives each
//! thread a contiguous slice of `k` and adds the partial products in a fixed order, so the
//! result is reproducible for a given thread count.

use gemm::Parallelism;
use std::sync::atomic::{AtomicU64, Ordering};

/// Calls into the `gemm` crate so far.
pub static GEMM_CALLS: AtomicU64 = AtomicU64::new(0);

/// Calls into the `gemm` crate currently running. `gemm` allocates its packing workspace
/// inside some calls; the `no_alloc` test uses this to tell those allocations from ours.
pub static GEMM_ACTIVE: AtomicU64 = AtomicU64::new(0);

/// Whether an operand is used as stored or transposed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Trans {
    /// Used as stored (row-major).
    No,
    /// Used transposed.
    Yes,
}

/// Strides `(col_stride, row_stride)` of a logical `rows x cols` operand.
fn strides(t: Trans, rows: usize, cols: usize) -> (isize, isize) {
    match t {
        Trans::No => (1, cols as isize),
        Trans::Yes => (rows as isize, 1),
    }
}

/// `C = op(A) op(B)` (or `C += ...` when `accumulate`), all row-major.
///
/// `op(A)` is `m x k`: `A` is stored `[m][k]` (`Trans::No`) or `[k][m]` (`Trans::Yes`);
/// `op(B)` is `k x n`: `B` stored `[k][n]` or `[n][k]`. `threads > 1` lets `gemm` use the
/// current rayon pool.
///
/// # Panics
/// If a slice is shorter than its shape says (the products run unchecked, so this is checked).
#[allow(clippy::too_many_arguments)]
pub fn sgemm(
    m: usize,
    n: usize,
    k: usize,
    a: &[f32],
    ta: Trans,
    b: &[f32],
    tb: Trans,
    c: &mut [f32],
    accumulate: bool,
    threads: usize,
) {
    assert!(a.len() >= m * k, "sgemm: A has {} < {m}x{k}", a.len());
    assert!(b.len() >= k * n, "sgemm: B has {} < {k}x{n}", b.len());
    assert!(c.len() >= m * n, "sgemm: C has {} < {m}x{n}", c.len());
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            c[..m * n].fill(0.0);
        }
        return;
    }
    let (a_cs, a_rs) = strides(ta, m, k);
    let (b_cs, b_rs) = strides(tb, k, n);
    let par = if threads > 1 { Parallelism::Rayon(threads) } else { Parallelism::None };
    GEMM_CALLS.fetch_add(1, Ordering::Relaxed);
    GEMM_ACTIVE.fetch_add(1, Ordering::SeqCst);
    // SAFETY: the asserts above bound every index gemm touches: A is m x k with the strides of
    // its storage, B k x n, C m x n row-major.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            c.as_mut_ptr(),
            1,
            n as isize,
            accumulate,
            a.as_ptr(),
            a_cs,
            a_rs,
            b.as_ptr(),
            b_cs,
            b_rs,
            1.0,
            1.0,
            false,
            false,
            false,
            par,
        );
    }
    GEMM_ACTIVE.fetch_sub(1, Ordering::SeqCst);
}

/// `C (+)= op(A) op(B)` on strided sub-matrices, single-threaded (for many small products run
/// in parallel by the caller, e.g. attention over (image, head)).
///
/// Like [`sgemm`], but each operand's rows are `lda`, `ldb`, `ldc` floats apart (its leading
/// dimension), so a head's slice of a token matrix is used in place: `A` is stored `[m][k]`
/// with row stride `lda >= k` (`Trans::No`) or `[k][m]` with `lda >= m` (`Trans::Yes`); `B`
/// alike with `k x n`; `C` is `[m][n]` with row stride `ldc >= n`.
///
/// # Panics
/// If a stride is shorter than its row or a slice shorter than its strided shape.
#[allow(clippy::too_many_arguments)]
pub fn sgemm_ld(
    m: usize,
    n: usize,
    k: usize,
    a: &[f32],
    ta: Trans,
    lda: usize,
    b: &[f32],
    tb: Trans,
    ldb: usize,
    c: &mut [f32],
    ldc: usize,
    accumulate: bool,
) {
    if m == 0 || n == 0 {
        return;
    }
    // Stored rows and columns of each operand.
    let dims = |t: Trans, r: usize, cc: usize| if t == Trans::No { (r, cc) } else { (cc, r) };
    let need = |(rows, cols): (usize, usize), ld: usize| if rows == 0 { 0 } else { (rows - 1) * ld + cols };
    let (sa, sb) = (dims(ta, m, k), dims(tb, k, n));
    assert!(lda >= sa.1 && ldb >= sb.1 && ldc >= n, "sgemm_ld: a leading dimension is shorter than its row");
    assert!(a.len() >= need(sa, lda) && b.len() >= need(sb, ldb), "sgemm_ld: an operand is too short");
    assert!(c.len() >= need((m, n), ldc), "sgemm_ld: C is too short");
    if k == 0 {
        if !accumulate {
            for row in c.chunks_mut(ldc).take(m) {
                row[..n].fill(0.0);
            }
        }
        return;
    }
    let st = |t: Trans, ld: usize| if t == Trans::No { (1isize, ld as isize) } else { (ld as isize, 1isize) };
    let ((a_cs, a_rs), (b_cs, b_rs)) = (st(ta, lda), st(tb, ldb));
    GEMM_CALLS.fetch_add(1, Ordering::Relaxed);
    GEMM_ACTIVE.fetch_add(1, Ordering::SeqCst);
    // SAFETY: the asserts above bound every index: element (i, j) of op(A) is at
    // i * a_rs + j * a_cs, whose largest value is the last element of A's stored shape; the
    // same holds for B and for C (row stride ldc, column stride 1).
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            c.as_mut_ptr(),
            1,
            ldc as isize,
            accumulate,
            a.as_ptr(),
            a_cs,
            a_rs,
            b.as_ptr(),
            b_cs,
            b_rs,
            1.0,
            1.0,
            false,
            false,
            false,
            Parallelism::None,
        );
    }
    GEMM_ACTIVE.fetch_sub(1, Ordering::SeqCst);
}

/// `C (+)= A^T B` for `A` stored `[k][m]` and `B` stored `[k][n]` with a long `k` (the
/// weight gradient `dW = dY^T X` over all pixels of a batch), split into `threads` slices of
/// `k` computed in parallel. `scratch` must hold [`split_k_scratch_len`] floats; partial
/// products are added in slice order, so the result depends only on the thread count.
#[allow(clippy::too_many_arguments)]
pub fn sgemm_tn_split_k(
    m: usize,
    n: usize,
    k: usize,
    a: &[f32],
    b: &[f32],
    c: &mut [f32],
    accumulate: bool,
    threads: usize,
    scratch: &mut [f32],
) {
    use rayon::prelude::*;
    let parts = split_k_parts(k, threads);
    if parts == 1 {
        sgemm(m, n, k, a, Trans::Yes, b, Trans::No, c, accumulate, 1);
        return;
    }
    let mn = m * n;
    assert!(scratch.len() >= parts * mn, "sgemm_tn_split_k: scratch too small");
    assert!(a.len() >= m * k && b.len() >= k * n && c.len() >= mn);
    scratch[..parts * mn].par_chunks_mut(mn).enumerate().for_each(|(i, part)| {
        let r = crate::chunk_range(k, parts, i);
        sgemm(
            m,
            n,
            r.len(),
            &a[r.start * m..r.end * m],
            Trans::Yes,
            &b[r.start * n..r.end * n],
            Trans::No,
            part,
            false,
            1,
        );
    });
    let c = &mut c[..mn];
    if !accumulate {
        c.copy_from_slice(&scratch[..mn]);
    }
    for i in usize::from(!accumulate)..parts {
        crate::elementwise::add_assign(c, &scratch[i * mn..(i + 1) * mn]);
    }
}

fn split_k_parts(k: usize, threads: usize) -> usize {
    if k >= 4096 {
        threads.max(1)
    } else {
        1
    }
}

/// Scratch floats [`sgemm_tn_split_k`] needs for an `m x n` result over `k` with `threads`.
pub fn split_k_scratch_len(m: usize, n: usize, k: usize, threads: usize) -> usize {
    let parts = split_k_parts(k, threads);
    if parts == 1 {
        0
    } else {
        parts * m * n
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reference::matmul as refmm;
    use crate::rng::Rng;

    fn rand_vec(r: &mut Rng, n: usize) -> Vec<f32> {
        (0..n).map(|_| r.normal()).collect()
    }

    #[test]
    fn all_transposes_match_reference() {
        let mut r = Rng::new(1);
        for &(m, n, k) in &[(1, 1, 1), (3, 5, 7), (17, 9, 33), (64, 10, 128)] {
            for ta in [Trans::No, Trans::Yes] {
                for tb in [Trans::No, Trans::Yes] {
                    let a = rand_vec(&mut r, m * k);
                    let b = rand_vec(&mut r, k * n);
                    let c0 = rand_vec(&mut r, m * n);
                    for acc in [false, true] {
                        let mut want = c0.clone();
                        refmm(m, n, k, &a, ta == Trans::Yes, &b, tb == Trans::Yes, &mut want, acc);
                        let mut got = c0.clone();
                        sgemm(m, n, k, &a, ta, &b, tb, &mut got, acc, 2);
                        for (g, w) in got.iter().zip(&want) {
                            assert!((g - w).abs() <= 1e-4 * (1.0 + w.abs()), "{g} vs {w}");
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn strided_matches_reference_on_sub_matrices() {
        let mut r = Rng::new(3);
        let (m, n, k) = (5, 4, 6);
        let (lda, ldb, ldc) = (9, 11, 7);
        for ta in [Trans::No, Trans::Yes] {
            for tb in [Trans::No, Trans::Yes] {
                let a = rand_vec(&mut r, 12 * lda);
                let b = rand_vec(&mut r, 12 * ldb);
                let c0 = rand_vec(&mut r, m * ldc);
                // Dense copies of the strided operands.
                let (ar, ac) = if ta == Trans::No { (m, k) } else { (k, m) };
                let (br, bc) = if tb == Trans::No { (k, n) } else { (n, k) };
                let ad: Vec<f32> = (0..ar).flat_map(|i| a[i * lda..i * lda + ac].to_vec()).collect();
                let bd: Vec<f32> = (0..br).flat_map(|i| b[i * ldb..i * ldb + bc].to_vec()).collect();
                for acc in [false, true] {
                    let mut want: Vec<f32> = (0..m).flat_map(|i| c0[i * ldc..i * ldc + n].to_vec()).collect();
                    refmm(m, n, k, &ad, ta == Trans::Yes, &bd, tb == Trans::Yes, &mut want, acc);
                    let mut got = c0.clone();
                    sgemm_ld(m, n, k, &a, ta, lda, &b, tb, ldb, &mut got, ldc, acc);
                    for i in 0..m {
                        for j in 0..ldc {
                            let g = got[i * ldc + j];
                            if j < n {
                                let w = want[i * n + j];
                                assert!((g - w).abs() <= 1e-4 * (1.0 + w.abs()), "{g} vs {w}");
                            } else {
                                assert_eq!(g, c0[i * ldc + j], "padding column {j} was written");
                            }
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn split_k_matches_reference() {
        let mut r = Rng::new(2);
        let (m, n, k) = (8, 6, 5000);
        let a = rand_vec(&mut r, k * m);
        let b = rand_vec(&mut r, k * n);
        let mut want = vec![1.0; m * n];
        refmm(m, n, k, &a, true, &b, false, &mut want, true);
        let pool = rayon::ThreadPoolBuilder::new().num_threads(3).build().unwrap();
        let mut got = vec![1.0; m * n];
        let mut scratch = vec![0.0; split_k_scratch_len(m, n, k, 3)];
        pool.install(|| sgemm_tn_split_k(m, n, k, &a, &b, &mut got, true, 3, &mut scratch));
        for (g, w) in got.iter().zip(&want) {
            assert!((g - w).abs() <= 1e-3 * (1.0 + w.abs()), "{g} vs {w}");
        }
    }
}

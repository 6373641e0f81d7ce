//! Element-wise and per-channel kernels (activations, batch-norm arithmetic, reductions).
//!
//! Bodies are `#[inline(always)]` loops over contiguous slices, run through
//! [`crate::dispatch::with_simd`] so they are vectorized with AVX2 where available. They do
//! not reassociate sums across lanes, so every path gives bit-identical results.

use crate::dispatch::with_simd;
use rayon::prelude::*;

/// Rows per parallel task for row-wise per-channel work.
const ROW_BLOCK: usize = 256;

/// `a += b`, element-wise, inlined into the caller.
#[inline(always)]
pub fn add_assign_inline(a: &mut [f32], b: &[f32]) {
    for (a, &b) in a.iter_mut().zip(b) {
        *a += b;
    }
}

/// `a = b` (`add == false`) or `a += b`.
pub fn write_or_add(a: &mut [f32], b: &[f32], add: bool) {
    if add {
        add_assign(a, b)
    } else {
        a.copy_from_slice(b)
    }
}

/// `a += b`, element-wise.
pub fn add_assign(a: &mut [f32], b: &[f32]) {
    assert_eq!(a.len(), b.len());
    with_simd(|| add_assign_inline(a, b))
}

/// `y = max(x, 0)`.
pub fn relu_forward(x: &[f32], y: &mut [f32]) {
    y.par_chunks_mut(1 << 14).zip(x.par_chunks(1 << 14)).for_each(|(y, x)| {
        with_simd(|| {
            for (y, &x) in y.iter_mut().zip(x) {
                *y = x.max(0.0);
            }
        })
    });
}

/// `dx (+)= dy * [y > 0]` (uses the forward output; adds when `add`).
pub fn relu_backward(y: &[f32], dy: &[f32], dx: &mut [f32], add: bool) {
    dx.par_chunks_mut(1 << 14).zip(y.par_chunks(1 << 14).zip(dy.par_chunks(1 << 14))).for_each(|(dx, (y, dy))| {
        with_simd(|| {
            if add {
                for ((dx, &y), &dy) in dx.iter_mut().zip(y).zip(dy) {
                    *dx += if y > 0.0 { dy } else { 0.0 };
                }
            } else {
                for ((dx, &y), &dy) in dx.iter_mut().zip(y).zip(dy) {
                    *dx = if y > 0.0 { dy } else { 0.0 };
                }
            }
        })
    });
}

/// `y = clamp(x, lo, hi)`.
pub fn hardtanh_forward(x: &[f32], y: &mut [f32], lo: f32, hi: f32) {
    y.par_chunks_mut(1 << 14).zip(x.par_chunks(1 << 14)).for_each(|(y, x)| {
        with_simd(|| {
            for (y, &x) in y.iter_mut().zip(x) {
                *y = x.max(lo).min(hi);
            }
        })
    });
}

/// `dx (+)= dy * [lo < x < hi]` (uses the forward input; adds when `add`).
pub fn hardtanh_backward(x: &[f32], dy: &[f32], dx: &mut [f32], lo: f32, hi: f32, add: bool) {
    dx.par_chunks_mut(1 << 14).zip(x.par_chunks(1 << 14).zip(dy.par_chunks(1 << 14))).for_each(|(dx, (x, dy))| {
        with_simd(|| {
            for ((dx, &x), &dy) in dx.iter_mut().zip(x).zip(dy) {
                let g = if x > lo && x < hi { dy } else { 0.0 };
                *dx = if add { *dx + g } else { g };
            }
        })
    });
}

/// Per-channel sums over the rows of `x[rows][c]` for two quantities at once:
/// `out_a[ch] = sum_r fa(x[r][ch])`-style reductions are built from this block-partial
/// scheme. Here: `sum[ch] = sum_r x[r][ch]` and `sumsq[ch] = sum_r (x[r][ch] - shift[ch])^2`,
/// accumulated in f64 per block of rows, blocks added in order (reproducible).
pub fn channel_sums(x: &[f32], c: usize, shift: &[f32], sum: &mut [f64], sumsq: &mut [f64], scratch: &mut [f64]) {
    let rows = x.len() / c;
    let blocks = rows.div_ceil(ROW_BLOCK);
    let scratch = &mut scratch[..blocks * 2 * c];
    scratch.par_chunks_mut(2 * c).enumerate().for_each(|(bi, acc)| {
        let (s, q) = acc.split_at_mut(c);
        s.fill(0.0);
        q.fill(0.0);
        let r0 = bi * ROW_BLOCK;
        let r1 = (r0 + ROW_BLOCK).min(rows);
        with_simd(|| {
            for r in r0..r1 {
                let row = &x[r * c..][..c];
                for ch in 0..c {
                    let v = row[ch] as f64;
                    let d = (row[ch] - shift[ch]) as f64;
                    s[ch] += v;
                    q[ch] += d * d;
                }
            }
        })
    });
    sum.fill(0.0);
    sumsq.fill(0.0);
    for acc in scratch.chunks(2 * c) {
        for ch in 0..c {
            sum[ch] += acc[ch];
            sumsq[ch] += acc[c + ch];
        }
    }
}

/// Scratch (f64) that [`channel_sums`] and [`channel_dot_sums`] need.
pub fn channel_sums_scratch_len(rows: usize, c: usize) -> usize {
    rows.div_ceil(ROW_BLOCK) * 2 * c
}

/// Per-channel `sa[ch] = sum_r a[r][ch]` and `sab[ch] = sum_r a[r][ch] * (b[r][ch] - shift[ch])`,
/// in f64 per block of rows (the batch-norm backward reductions with `a = dy`, `b = x`).
pub fn channel_dot_sums(
    a: &[f32],
    b: &[f32],
    c: usize,
    shift: &[f32],
    sa: &mut [f64],
    sab: &mut [f64],
    scratch: &mut [f64],
) {
    let rows = a.len() / c;
    let blocks = rows.div_ceil(ROW_BLOCK);
    let scratch = &mut scratch[..blocks * 2 * c];
    scratch.par_chunks_mut(2 * c).enumerate().for_each(|(bi, acc)| {
        let (s, q) = acc.split_at_mut(c);
        s.fill(0.0);
        q.fill(0.0);
        let r0 = bi * ROW_BLOCK;
        let r1 = (r0 + ROW_BLOCK).min(rows);
        with_simd(|| {
            for r in r0..r1 {
                let ra = &a[r * c..][..c];
                let rb = &b[r * c..][..c];
                for ch in 0..c {
                    s[ch] += ra[ch] as f64;
                    q[ch] += ra[ch] as f64 * (rb[ch] - shift[ch]) as f64;
                }
            }
        })
    });
    sa.fill(0.0);
    sab.fill(0.0);
    for acc in scratch.chunks(2 * c) {
        for ch in 0..c {
            sa[ch] += acc[ch];
            sab[ch] += acc[c + ch];
        }
    }
}

/// Per-channel affine over rows: `y[r][ch] = x[r][ch] * scale[ch] + shift[ch]`, optionally
/// followed by ReLU (`relu`).
pub fn channel_affine(x: &[f32], y: &mut [f32], c: usize, scale: &[f32], shift: &[f32], relu: bool) {
    let chunk = ROW_BLOCK * c;
    y.par_chunks_mut(chunk).zip(x.par_chunks(chunk)).for_each(|(y, x)| {
        with_simd(|| {
            for (yr, xr) in y.chunks_exact_mut(c).zip(x.chunks_exact(c)) {
                for ch in 0..c {
                    let v = xr[ch] * scale[ch] + shift[ch];
                    yr[ch] = if relu { v.max(0.0) } else { v };
                }
            }
        })
    });
}

/// Batch-norm input gradient over rows:
/// `dx[r][ch] (+)= k1[ch] * dy[r][ch] + k2[ch] * x[r][ch] + k3[ch]` (adds when `add`).
#[allow(clippy::too_many_arguments)]
pub fn channel_grad_combine(
    dy: &[f32],
    x: &[f32],
    dx: &mut [f32],
    c: usize,
    k1: &[f32],
    k2: &[f32],
    k3: &[f32],
    add: bool,
) {
    let chunk = ROW_BLOCK * c;
    dx.par_chunks_mut(chunk).zip(dy.par_chunks(chunk).zip(x.par_chunks(chunk))).for_each(|(dx, (dy, x))| {
        with_simd(|| {
            let rows = dx.chunks_exact_mut(c).zip(dy.chunks_exact(c)).zip(x.chunks_exact(c));
            if add {
                for ((dr, gr), xr) in rows {
                    for ch in 0..c {
                        dr[ch] += k1[ch] * gr[ch] + k2[ch] * xr[ch] + k3[ch];
                    }
                }
            } else {
                for ((dr, gr), xr) in rows {
                    for ch in 0..c {
                        dr[ch] = k1[ch] * gr[ch] + k2[ch] * xr[ch] + k3[ch];
                    }
                }
            }
        })
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Rng;

    #[test]
    fn channel_sums_match_reference() {
        let mut r = Rng::new(5);
        let (rows, c) = (1000, 7);
        let x: Vec<f32> = (0..rows * c).map(|_| r.normal() * 3.0 + 1.0).collect();
        let (mean, var) = crate::reference::channel_mean_var(&x, c);
        let mut s = vec![0.0; c];
        let mut q = vec![0.0; c];
        let mut scratch = vec![0.0; channel_sums_scratch_len(rows, c)];
        channel_sums(&x, c, &mean, &mut s, &mut q, &mut scratch);
        for ch in 0..c {
            assert!(((s[ch] / rows as f64) as f32 - mean[ch]).abs() < 1e-5);
            assert!(((q[ch] / rows as f64) as f32 - var[ch]).abs() < 1e-4 * var[ch]);
        }
    }

    #[test]
    fn relu_and_hardtanh() {
        let x = [-2.0, -0.5, 0.0, 0.5, 2.0];
        let mut y = [0.0; 5];
        relu_forward(&x, &mut y);
        assert_eq!(y, [0.0, 0.0, 0.0, 0.5, 2.0]);
        let mut dx = [1.0; 5];
        relu_backward(&y, &[1.0; 5], &mut dx, true);
        assert_eq!(dx, [1.0, 1.0, 1.0, 2.0, 2.0]);
        relu_backward(&y, &[1.0; 5], &mut dx, false);
        assert_eq!(dx, [0.0, 0.0, 0.0, 1.0, 1.0]);
        hardtanh_forward(&x, &mut y, -1.0, 1.0);
        assert_eq!(y, [-1.0, -0.5, 0.0, 0.5, 1.0]);
        let mut dx = [0.0; 5];
        hardtanh_backward(&x, &[3.0; 5], &mut dx, -1.0, 1.0, true);
        assert_eq!(dx, [0.0, 3.0, 3.0, 3.0, 0.0]);
    }
}

//! Element-wise and per-channel kernels (activations, batch-norm arithmetic, reductions).
//!
//! Bodies are `#[inline(always)]` loops over contiguous slices, run through
//! [`crate::dispatch::with_simd`] so they are vectorized with AVX2 where available. They do
//! not reassociate sums across lanes, so every path gives bit-identical results.

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

crate::simd_kernel! {
    /// `a += b`, element-wise.
    pub fn add_assign(a: &mut [f32], b: &[f32]) {
        assert_eq!(a.len(), b.len());
        for (a, &b) in a.iter_mut().zip(b) {
            *a += b;
        }
    }
}

crate::simd_kernel! {
    fn relu_fwd(x: &[f32], y: &mut [f32]) {
        for (y, &x) in y.iter_mut().zip(x) {
            *y = x.max(0.0);
        }
    }
}

crate::simd_kernel! {
    fn relu_bwd(y: &[f32], dy: &[f32], dx: &mut [f32], add: bool) {
        if add {
            for ((dx, &y), &dy) in dx.iter_mut().zip(y).zip(dy) {
                *dx += if y > 0.0 { dy } else { 0.0 };
            }
        } else {
            for ((dx, &y), &dy) in dx.iter_mut().zip(y).zip(dy) {
                *dx = if y > 0.0 { dy } else { 0.0 };
            }
        }
    }
}

crate::simd_kernel! {
    fn hardtanh_fwd(x: &[f32], y: &mut [f32], lo: f32, hi: f32) {
        for (y, &x) in y.iter_mut().zip(x) {
            *y = x.max(lo).min(hi);
        }
    }
}

crate::simd_kernel! {
    fn hardtanh_bwd(x: &[f32], dy: &[f32], dx: &mut [f32], lo: f32, hi: f32, add: bool) {
        if add {
            for ((dx, &x), &dy) in dx.iter_mut().zip(x).zip(dy) {
                *dx += if x > lo && x < hi { dy } else { 0.0 };
            }
        } else {
            for ((dx, &x), &dy) in dx.iter_mut().zip(x).zip(dy) {
                *dx = if x > lo && x < hi { dy } else { 0.0 };
            }
        }
    }
}

/// Add a bias to every row: `y[r][j] += b[j]` for the rows of `y[rows][b.len()]`.
pub fn add_bias_rows(y: &mut [f32], b: &[f32]) {
    for row in y.chunks_exact_mut(b.len()) {
        add_assign_inline(row, b);
    }
}

/// Bias gradient: `gb[j] += sum_r dy[r][j]` over the rows of `dy[rows][gb.len()]`.
pub fn bias_grad_rows(dy: &[f32], gb: &mut [f32]) {
    for row in dy.chunks_exact(gb.len()) {
        add_assign_inline(gb, row);
    }
}

const EW_CHUNK: usize = 1 << 14;

/// `y = max(x, 0)`.
pub fn relu_forward(x: &[f32], y: &mut [f32]) {
    y.par_chunks_mut(EW_CHUNK).zip(x.par_chunks(EW_CHUNK)).for_each(|(y, x)| relu_fwd(x, y));
}

/// `dx (+)= dy * [y > 0]` (uses the forward output; adds when `add`).
pub fn relu_backward(y: &[f32], dy: &[f32], dx: &mut [f32], add: bool) {
    dx.par_chunks_mut(EW_CHUNK)
        .zip(y.par_chunks(EW_CHUNK).zip(dy.par_chunks(EW_CHUNK)))
        .for_each(|(dx, (y, dy))| relu_bwd(y, dy, dx, add));
}

/// `y = clamp(x, lo, hi)`.
pub fn hardtanh_forward(x: &[f32], y: &mut [f32], lo: f32, hi: f32) {
    y.par_chunks_mut(EW_CHUNK).zip(x.par_chunks(EW_CHUNK)).for_each(|(y, x)| hardtanh_fwd(x, y, lo, hi));
}

/// `dx (+)= dy * [lo < x < hi]` (uses the forward input; adds when `add`).
pub fn hardtanh_backward(x: &[f32], dy: &[f32], dx: &mut [f32], lo: f32, hi: f32, add: bool) {
    dx.par_chunks_mut(EW_CHUNK)
        .zip(x.par_chunks(EW_CHUNK).zip(dy.par_chunks(EW_CHUNK)))
        .for_each(|(dx, (x, dy))| hardtanh_bwd(x, dy, dx, lo, hi, add));
}

/// True when the AVX2 per-channel kernels apply (AVX2 path and whole 8-channel blocks).
#[inline]
fn avx2_channels(c: usize) -> bool {
    cfg!(target_arch = "x86_64") && c.is_multiple_of(8) && crate::kernel_path() == crate::KernelPath::Avx2
}

/// Run `body(block_index, rows, accumulators)` for each block of [`ROW_BLOCK`] rows in
/// parallel, each with its own zeroed `2c` f32 accumulators in `scratch`; then add the blocks'
/// accumulators in order, in f64, into `out_a` and `out_b`. The result depends only on the
/// data, not on the thread count.
fn per_channel_reduce(
    rows: usize,
    c: usize,
    scratch: &mut [f32],
    out_a: &mut [f64],
    mut out_b: Option<&mut [f64]>,
    body: impl Fn(std::ops::Range<usize>, &mut [f32], &mut [f32]) + Sync,
) {
    let blocks = rows.div_ceil(ROW_BLOCK);
    let scratch = &mut scratch[..blocks * 2 * c];
    scratch.par_chunks_mut(2 * c).enumerate().for_each(|(bi, acc)| {
        acc.fill(0.0);
        let (a, b) = acc.split_at_mut(c);
        body(bi * ROW_BLOCK..((bi + 1) * ROW_BLOCK).min(rows), a, b);
    });
    out_a.fill(0.0);
    if let Some(b) = out_b.as_deref_mut() {
        b.fill(0.0);
    }
    for acc in scratch.chunks(2 * c) {
        for ch in 0..c {
            out_a[ch] += acc[ch] as f64;
        }
        if let Some(b) = out_b.as_deref_mut() {
            for ch in 0..c {
                b[ch] += acc[c + ch] as f64;
            }
        }
    }
}

/// Scratch (f32) that [`channel_sums`] and [`channel_dot_sums`] need for `rows` x `c`.
pub fn channel_sums_scratch_len(rows: usize, c: usize) -> usize {
    rows.div_ceil(ROW_BLOCK) * 2 * c
}

/// Per-channel `sum[ch] = sum_r x[r][ch]` and `sumsq[ch] = sum_r (x[r][ch] - shift[ch])^2`
/// over the rows of `x[rows][c]` (batch-norm statistics; a `shift` near the mean keeps the
/// squares well conditioned). f32 within blocks of `ROW_BLOCK` rows, f64 across blocks.
pub fn channel_sums(x: &[f32], c: usize, shift: &[f32], sum: &mut [f64], sumsq: &mut [f64], scratch: &mut [f32]) {
    per_channel_reduce(x.len() / c, c, scratch, sum, Some(sumsq), |r, s, q| {
        let x = &x[r.start * c..r.end * c];
        #[cfg(target_arch = "x86_64")]
        if avx2_channels(c) {
            // SAFETY: the AVX2 path is only chosen when the CPU has AVX2; c % 8 == 0.
            return unsafe { crate::x86_64::avx2_channel_sums(x, c, shift, s, q) };
        }
        for row in x.chunks_exact(c) {
            for ch in 0..c {
                let v = row[ch];
                let d = v - shift[ch];
                s[ch] += v;
                q[ch] += d * d;
            }
        }
    });
}

/// `dy` masked by a ReLU recomputed from `x`: `dy * [x * scale + shift > 0]`.
#[inline(always)]
fn masked(dy: f32, x: f32, mask: Option<(&[f32], &[f32])>, ch: usize) -> f32 {
    match mask {
        Some((sc, sh)) if x * sc[ch] + sh[ch] > 0.0 => dy,
        Some(_) => 0.0,
        None => dy,
    }
}

/// Per-channel `sa[ch] = sum_r g[r][ch]` and `sab[ch] = sum_r g[r][ch] * (x[r][ch] - mean[ch])`,
/// where `g = dy`, or with `mask = Some((scale, shift))`, `g = dy * [x * scale + shift > 0]`
/// (the backward of a ReLU fused after the affine, recomputed from `x` so the output is not
/// read). The batch-norm backward reductions. Blocking as in [`channel_sums`].
#[allow(clippy::too_many_arguments)]
pub fn channel_dot_sums(
    dy: &[f32],
    x: &[f32],
    mask: Option<(&[f32], &[f32])>,
    c: usize,
    mean: &[f32],
    sa: &mut [f64],
    sab: &mut [f64],
    scratch: &mut [f32],
) {
    per_channel_reduce(x.len() / c, c, scratch, sa, Some(sab), |r, s, q| {
        let (dy, x) = (&dy[r.start * c..r.end * c], &x[r.start * c..r.end * c]);
        #[cfg(target_arch = "x86_64")]
        if avx2_channels(c) {
            // SAFETY: the AVX2 path is only chosen when the CPU has AVX2; c % 8 == 0.
            return unsafe { crate::x86_64::avx2_dot_sums(dy, x, c, mask, mean, s, q) };
        }
        for (rd, rx) in dy.chunks_exact(c).zip(x.chunks_exact(c)) {
            for ch in 0..c {
                let g = masked(rd[ch], rx[ch], mask, ch);
                s[ch] += g;
                q[ch] += g * (rx[ch] - mean[ch]);
            }
        }
    });
}

/// Per-channel affine over rows: `y[r][ch] = x[r][ch] * scale[ch] + shift[ch]`, optionally
/// followed by ReLU (`relu`).
pub fn channel_affine(x: &[f32], y: &mut [f32], c: usize, scale: &[f32], shift: &[f32], relu: bool) {
    let chunk = ROW_BLOCK * c;
    y.par_chunks_mut(chunk).zip(x.par_chunks(chunk)).for_each(|(y, x)| {
        #[cfg(target_arch = "x86_64")]
        if avx2_channels(c) {
            // SAFETY: the AVX2 path is only chosen when the CPU has AVX2; c % 8 == 0.
            return unsafe { crate::x86_64::avx2_channel_affine(x, y, c, scale, shift, relu) };
        }
        for (yr, xr) in y.chunks_exact_mut(c).zip(x.chunks_exact(c)) {
            for ch in 0..c {
                let v = xr[ch] * scale[ch] + shift[ch];
                yr[ch] = if relu { v.max(0.0) } else { v };
            }
        }
    });
}

/// Batch-norm input gradient over rows: `dx[r][ch] (+)= k1[ch] g + k2[ch] x[r][ch] + k3[ch]`
/// with `g` as in [`channel_dot_sums`]; adds when `add`, else overwrites.
#[allow(clippy::too_many_arguments)]
pub fn channel_grad_combine(
    dy: &[f32],
    x: &[f32],
    mask: Option<(&[f32], &[f32])>,
    dx: &mut [f32],
    c: usize,
    k: [&[f32]; 3],
    add: bool,
) {
    let chunk = ROW_BLOCK * c;
    dx.par_chunks_mut(chunk).enumerate().for_each(|(bi, dx)| {
        let o = bi * chunk;
        let (dy, x) = (&dy[o..o + dx.len()], &x[o..o + dx.len()]);
        #[cfg(target_arch = "x86_64")]
        if avx2_channels(c) {
            // SAFETY: the AVX2 path is only chosen when the CPU has AVX2; c % 8 == 0.
            return unsafe { crate::x86_64::avx2_grad_combine(dy, x, dx, c, mask, k, add) };
        }
        let [k1, k2, k3] = k;
        for ((dr, gr), xr) in dx.chunks_exact_mut(c).zip(dy.chunks_exact(c)).zip(x.chunks_exact(c)) {
            for ch in 0..c {
                let g = masked(gr[ch], xr[ch], mask, ch);
                let v = k1[ch] * g + k2[ch] * xr[ch] + k3[ch];
                dr[ch] = if add { dr[ch] + v } else { v };
            }
        }
    });
}

crate::simd_kernel! {
    fn sign_rows(x: &[f32], y: &mut [f32], c: usize, t: &[f32]) {
        let t = &t[..c];
        for (yr, xr) in y.chunks_exact_mut(c).zip(x.chunks_exact(c)) {
            for ((y, &x), &t) in yr.iter_mut().zip(xr).zip(t) {
                *y = if x > t { 1.0 } else { -1.0 };
            }
        }
    }
}

crate::simd_kernel! {
    /// One block of rows of the binary-activation backward: `g = dy * [|x - t| <= 1]`,
    /// `dx (+)= g` and `s[ch] -= g`, in one pass over `x` and `dy`.
    fn sign_bwd_rows(x: &[f32], dy: &[f32], dx: &mut [f32], c: usize, t: &[f32], add: bool, s: &mut [f32]) {
        let (t, s) = (&t[..c], &mut s[..c]);
        for ((dr, gr), xr) in dx.chunks_exact_mut(c).zip(dy.chunks_exact(c)).zip(x.chunks_exact(c)) {
            for ((((d, &g), &x), &t), s) in dr.iter_mut().zip(gr).zip(xr).zip(t).zip(s.iter_mut()) {
                let g = if (x - t).abs() <= 1.0 { g } else { 0.0 };
                *d = if add { *d + g } else { g };
                *s -= g;
            }
        }
    }
}

/// Binary activation forward over rows of `c` channels: `y = +1 if x > t[ch] else -1`.
pub fn sign_threshold_forward(x: &[f32], y: &mut [f32], c: usize, t: &[f32]) {
    let chunk = ROW_BLOCK * c;
    y.par_chunks_mut(chunk).zip(x.par_chunks(chunk)).for_each(|(y, x)| sign_rows(x, y, c, t));
}

/// Binary activation backward (straight-through, clipped identity):
/// `g = dy * [|x - t[ch]| <= 1]`, `dx (+)= g`, and `dt[ch] = -sum_rows g` (written, f32 within
/// blocks of rows and f64 across them, reproducible). `scratch`: [`channel_sums_scratch_len`].
#[allow(clippy::too_many_arguments)]
pub fn sign_threshold_backward(
    x: &[f32],
    dy: &[f32],
    dx: &mut [f32],
    c: usize,
    t: &[f32],
    add: bool,
    dt: &mut [f64],
    scratch: &mut [f32],
) {
    // One pass: each block of rows writes its part of `dx` and its own partial sums, which are
    // then added in block order (so the result does not depend on the thread count).
    let chunk = ROW_BLOCK * c;
    let blocks = (x.len() / c).div_ceil(ROW_BLOCK);
    let scratch = &mut scratch[..blocks * c];
    scratch.par_chunks_mut(c).zip(dx.par_chunks_mut(chunk)).enumerate().for_each(|(bi, (s, dx))| {
        s.fill(0.0);
        let o = bi * chunk;
        sign_bwd_rows(&x[o..o + dx.len()], &dy[o..o + dx.len()], dx, c, t, add, s)
    });
    dt[..c].fill(0.0);
    for s in scratch.chunks_exact(c) {
        for (d, &v) in dt.iter_mut().zip(s) {
            *d += v as f64;
        }
    }
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
        let mut scratch = vec![0.0f32; channel_sums_scratch_len(rows, c)];
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

    #[test]
    fn sign_threshold_backward_matches_plain_loops() {
        // Several blocks of rows (the last one partial) and both write and add modes.
        let mut r = Rng::new(9);
        let (rows, c) = (2 * ROW_BLOCK + 37, 24);
        let x: Vec<f32> = (0..rows * c).map(|_| r.normal() * 1.5).collect();
        let dy: Vec<f32> = (0..rows * c).map(|_| r.normal()).collect();
        let t: Vec<f32> = (0..c).map(|_| r.normal() * 0.5).collect();
        let mut scratch = vec![0.0f32; channel_sums_scratch_len(rows, c)];
        for add in [false, true] {
            let base: Vec<f32> = (0..rows * c).map(|_| r.normal()).collect();
            let mut dx = base.clone();
            let mut dt = vec![7.0f64; c];
            sign_threshold_backward(&x, &dy, &mut dx, c, &t, add, &mut dt, &mut scratch);
            let mut want_dt = vec![0.0f64; c];
            for i in 0..rows * c {
                let ch = i % c;
                let g = if (x[i] - t[ch]).abs() <= 1.0 { dy[i] } else { 0.0 };
                let want = if add { base[i] + g } else { g };
                assert_eq!(dx[i], want, "dx[{i}] add={add}");
                want_dt[ch] -= g as f64;
            }
            for ch in 0..c {
                assert!((dt[ch] - want_dt[ch]).abs() < 1e-4 * (1.0 + want_dt[ch].abs()), "dt[{ch}]");
            }
        }
    }
}

//! AVX2 kernels for the per-channel work of batch normalization and for depthwise
//! convolution. They only ever see whole blocks of 8 channels (`c % 8 == 0`); callers fall
//! back to the portable loops otherwise. They use separate multiply and add (no FMA) and the
//! same per-channel summation order as the portable code, so both paths give bit-identical
//! results.
//!
//! Every function is `unsafe` because it requires AVX2 (checked once by
//! [`crate::dispatch`]); slices are indexed with bounds-checked `get`-free arithmetic only
//! after the lengths are asserted.

#![allow(unsafe_op_in_unsafe_fn)]
use std::arch::x86_64::*;

#[inline(always)]
unsafe fn ld(p: &[f32], i: usize) -> __m256 {
    _mm256_loadu_ps(p.as_ptr().add(i))
}

#[inline(always)]
unsafe fn st(p: &mut [f32], i: usize, v: __m256) {
    _mm256_storeu_ps(p.as_mut_ptr().add(i), v)
}

/// `o[i] += a[i] * b[i]` (multiply, then add: the portable loop's rounding), 8 lanes at a
/// time with a scalar tail. Always inlined: call it only from an AVX2-enabled function
/// (such as the depthwise kernels in [`crate::conv`]), where its intrinsics inline too.
///
/// # Safety
/// AVX2 must be available.
#[inline(always)]
pub unsafe fn mul_add_into(o: &mut [f32], a: &[f32], b: &[f32]) {
    let n = o.len().min(a.len()).min(b.len());
    let whole = n - n % 8;
    for j in (0..whole).step_by(8) {
        st(o, j, _mm256_add_ps(ld(o, j), _mm256_mul_ps(ld(a, j), ld(b, j))));
    }
    for j in whole..n {
        o[j] += a[j] * b[j];
    }
}

/// `g = mask ? dy : 0` with the ReLU mask recomputed as `x * scale + shift > 0`.
#[inline(always)]
unsafe fn masked(dy: __m256, x: __m256, sc: __m256, sh: __m256) -> __m256 {
    let y = _mm256_add_ps(_mm256_mul_ps(x, sc), sh);
    let m = _mm256_cmp_ps::<_CMP_GT_OQ>(y, _mm256_setzero_ps());
    _mm256_and_ps(dy, m)
}

/// Over rows of `x[rows][c]`: `s[ch] += x`, `q[ch] += (x - shift)^2` (f32).
///
/// # Safety
/// AVX2 must be available; `c % 8 == 0`; `s`, `q`, `shift` hold `c` floats.
#[target_feature(enable = "avx2")]
pub unsafe fn avx2_channel_sums(x: &[f32], c: usize, shift: &[f32], s: &mut [f32], q: &mut [f32]) {
    assert!(c.is_multiple_of(8) && s.len() >= c && q.len() >= c && shift.len() >= c && x.len().is_multiple_of(c));
    for row in x.chunks_exact(c) {
        for j in (0..c).step_by(8) {
            let v = ld(row, j);
            let d = _mm256_sub_ps(v, ld(shift, j));
            st(s, j, _mm256_add_ps(ld(s, j), v));
            st(q, j, _mm256_add_ps(ld(q, j), _mm256_mul_ps(d, d)));
        }
    }
}

/// Over rows: `s[ch] += g`, `q[ch] += g * (x - mean)` with `g = dy` or, with a mask
/// `(scale, shift)`, `g = dy * [x * scale + shift > 0]`.
///
/// # Safety
/// AVX2 must be available; `c % 8 == 0`; per-channel slices hold `c` floats.
#[target_feature(enable = "avx2")]
#[allow(clippy::too_many_arguments)]
pub unsafe fn avx2_dot_sums(
    dy: &[f32],
    x: &[f32],
    c: usize,
    mask: Option<(&[f32], &[f32])>,
    mean: &[f32],
    s: &mut [f32],
    q: &mut [f32],
) {
    assert!(
        c.is_multiple_of(8)
            && s.len() >= c
            && q.len() >= c
            && mean.len() >= c
            && dy.len() == x.len()
            && x.len().is_multiple_of(c)
    );
    for (rd, rx) in dy.chunks_exact(c).zip(x.chunks_exact(c)) {
        for j in (0..c).step_by(8) {
            let xv = ld(rx, j);
            let g = match mask {
                Some((sc, sh)) => masked(ld(rd, j), xv, ld(sc, j), ld(sh, j)),
                None => ld(rd, j),
            };
            st(s, j, _mm256_add_ps(ld(s, j), g));
            st(q, j, _mm256_add_ps(ld(q, j), _mm256_mul_ps(g, _mm256_sub_ps(xv, ld(mean, j)))));
        }
    }
}

/// `y = x * scale + shift`, then ReLU if `relu`, over rows of `c` channels.
///
/// # Safety
/// AVX2 must be available; `c % 8 == 0`; `scale`, `shift` hold `c` floats.
#[target_feature(enable = "avx2")]
pub unsafe fn avx2_channel_affine(x: &[f32], y: &mut [f32], c: usize, scale: &[f32], shift: &[f32], relu: bool) {
    assert!(
        c.is_multiple_of(8) && scale.len() >= c && shift.len() >= c && x.len() == y.len() && x.len().is_multiple_of(c)
    );
    let zero = _mm256_setzero_ps();
    for (ry, rx) in y.chunks_exact_mut(c).zip(x.chunks_exact(c)) {
        for j in (0..c).step_by(8) {
            let v = _mm256_add_ps(_mm256_mul_ps(ld(rx, j), ld(scale, j)), ld(shift, j));
            st(ry, j, if relu { _mm256_max_ps(v, zero) } else { v });
        }
    }
}

/// `dx (+)= k1 * g + k2 * x + k3` with `g` as in [`avx2_dot_sums`].
///
/// # Safety
/// AVX2 must be available; `c % 8 == 0`; per-channel slices hold `c` floats.
#[target_feature(enable = "avx2")]
#[allow(clippy::too_many_arguments)]
pub unsafe fn avx2_grad_combine(
    dy: &[f32],
    x: &[f32],
    dx: &mut [f32],
    c: usize,
    mask: Option<(&[f32], &[f32])>,
    k: [&[f32]; 3],
    add: bool,
) {
    let [k1, k2, k3] = k;
    assert!(c.is_multiple_of(8) && k1.len() >= c && k2.len() >= c && k3.len() >= c);
    assert!(dy.len() == x.len() && dx.len() == x.len() && x.len().is_multiple_of(c));
    for ((rdx, rd), rx) in dx.chunks_exact_mut(c).zip(dy.chunks_exact(c)).zip(x.chunks_exact(c)) {
        for j in (0..c).step_by(8) {
            let xv = ld(rx, j);
            let g = match mask {
                Some((sc, sh)) => masked(ld(rd, j), xv, ld(sc, j), ld(sh, j)),
                None => ld(rd, j),
            };
            let v = _mm256_add_ps(_mm256_add_ps(_mm256_mul_ps(ld(k1, j), g), _mm256_mul_ps(ld(k2, j), xv)), ld(k3, j));
            st(rdx, j, if add { _mm256_add_ps(ld(rdx, j), v) } else { v });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Rng;

    fn v(r: &mut Rng, n: usize) -> Vec<f32> {
        (0..n).map(|_| r.normal()).collect()
    }

    /// Every AVX2 kernel equals the same arithmetic in scalar loops, bit for bit.
    #[test]
    fn avx2_kernels_equal_scalar_loops_exactly() {
        if !(is_x86_feature_detected!("avx2")) {
            return;
        }
        let mut r = Rng::new(11);
        let (rows, c) = (37, 24);
        let (x, dy, dx0) = (v(&mut r, rows * c), v(&mut r, rows * c), v(&mut r, rows * c));
        let (sc, sh, mean) = (v(&mut r, c), v(&mut r, c), v(&mut r, c));
        let (k1, k2, k3) = (v(&mut r, c), v(&mut r, c), v(&mut r, c));
        for mask in [None, Some((&sc[..], &sh[..]))] {
            let g = |i: usize| {
                let ch = i % c;
                match mask {
                    Some((a, b)) if x[i] * a[ch] + b[ch] > 0.0 => dy[i],
                    Some(_) => 0.0,
                    None => dy[i],
                }
            };
            let (mut s, mut q) = (vec![0.0; c], vec![0.0; c]);
            unsafe { avx2_dot_sums(&dy, &x, c, mask, &mean, &mut s, &mut q) };
            let (mut s2, mut q2) = (vec![0.0f32; c], vec![0.0f32; c]);
            for i in 0..rows * c {
                s2[i % c] += g(i);
                q2[i % c] += g(i) * (x[i] - mean[i % c]);
            }
            assert_eq!((s, q), (s2, q2));
            for add in [false, true] {
                let mut dx = dx0.clone();
                unsafe { avx2_grad_combine(&dy, &x, &mut dx, c, mask, [&k1, &k2, &k3], add) };
                let want: Vec<f32> = (0..rows * c)
                    .map(|i| {
                        let ch = i % c;
                        let v = k1[ch] * g(i) + k2[ch] * x[i] + k3[ch];
                        if add {
                            dx0[i] + v
                        } else {
                            v
                        }
                    })
                    .collect();
                assert_eq!(dx, want);
            }
        }
        let (mut s, mut q) = (vec![0.0; c], vec![0.0; c]);
        unsafe { avx2_channel_sums(&x, c, &sh, &mut s, &mut q) };
        let (mut s2, mut q2) = (vec![0.0f32; c], vec![0.0f32; c]);
        for i in 0..rows * c {
            let d = x[i] - sh[i % c];
            s2[i % c] += x[i];
            q2[i % c] += d * d;
        }
        assert_eq!((s, q), (s2, q2));
        for relu in [false, true] {
            let mut y = vec![0.0; rows * c];
            unsafe { avx2_channel_affine(&x, &mut y, c, &sc, &sh, relu) };
            let want: Vec<f32> = (0..rows * c)
                .map(|i| {
                    let v = x[i] * sc[i % c] + sh[i % c];
                    if relu {
                        v.max(0.0)
                    } else {
                        v
                    }
                })
                .collect();
            assert_eq!(y, want);
        }
    }
}

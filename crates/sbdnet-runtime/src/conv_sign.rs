//! The first convolution (float weights on float pixels, 32 or 64 output channels) fused
//! with its sign output on AVX-512: the sums of four output pixels stay in registers, the
//! folded affine, the activation and the comparison with the threshold run on them, and
//! `vcmpps` writes the sign bits straight into a mask register, so the raw sums never reach
//! memory.
//!
//! The arithmetic is the plan's scalar path's and the reference executor's, operation for
//! operation: products accumulated with fused multiply-add (`f32::mul_add`, one rounding per
//! tap) in tap order `(ky, kx, ci)`, then `scale * x + bias` (not fused), the
//! activation, `> t`. A tap in the zero padding adds `0 * w` (a signed zero) where the scalar
//! path skips it (the input is copied into a zero-padded buffer first, so the inner loops
//! have no border cases); that changes at most the sign of an exact zero sum, which no
//! comparison sees. The planner takes this kernel only for finite weights (where `0 * w` is
//! zero).

use sbdnet_kernels::conv::ConvGeom;

/// The folded sign stage: bit = `!(act(scale * x + bias) > t)` (`1` = `-1`).
pub(crate) struct SignStage<'a> {
    pub scale: &'a [f32],
    pub bias: &'a [f32],
    pub t: &'a [f32],
    /// 0 none, 1 ReLU, 2 hardtanh.
    pub act: u8,
}

/// Whether the fused kernel can run here (AVX-512 and no forced fallback).
pub(crate) fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        sbdnet_kernels::kernel_path() == sbdnet_kernels::KernelPath::Avx2 && is_x86_feature_detected!("avx512f")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Length of the zero-padded input [`pad_input`] writes.
pub(crate) fn padded_len(g: &ConvGeom) -> usize {
    g.batch * (g.h + 2 * g.pad) * (g.w + 2 * g.pad) * g.cin
}

/// Copy NHWC `x` into `xp` with `g.pad` zero rows and columns on every side.
fn pad_input(g: &ConvGeom, x: &[f32], xp: &mut [f32]) {
    let (wp, c) = (g.w + 2 * g.pad, g.cin);
    let xp = &mut xp[..padded_len(g)];
    xp.fill(0.0);
    for (b, img) in xp.chunks_exact_mut((g.h + 2 * g.pad) * wp * c).enumerate() {
        for iy in 0..g.h {
            let src = &x[(b * g.h + iy) * g.w * c..][..g.w * c];
            img[((iy + g.pad) * wp + g.pad) * c..][..g.w * c].copy_from_slice(src);
        }
    }
}

/// Convolution + sign for `g.cout` in {32, 64}: one output word per pixel. Weights
/// `[ky][kx][ci][co]`; `xp`: scratch of [`padded_len`]; requires [`available`].
pub(crate) fn conv_sign(g: &ConvGeom, x: &[f32], wt: &[f32], st: &SignStage, xp: &mut [f32], out: &mut [u64]) {
    assert!(available(), "the fused first convolution needs AVX-512");
    assert!(matches!(g.cout, 32 | 64) && g.groups == 1);
    assert!(x.len() >= g.in_len() && wt.len() >= g.weight_len() && out.len() >= g.batch * g.oh * g.ow);
    assert!(st.scale.len() >= g.cout && st.bias.len() >= g.cout && st.t.len() >= g.cout);
    // Every tap of every output pixel lies inside the padded image.
    assert!((g.oh - 1) * g.stride + g.kh <= g.h + 2 * g.pad && (g.ow - 1) * g.stride + g.kw <= g.w + 2 * g.pad);
    pad_input(g, x, xp);
    #[cfg(target_arch = "x86_64")]
    // SAFETY: `available` checked avx512f; the slices hold what the loops index (asserted).
    unsafe {
        if g.cout == 32 {
            avx512::conv_sign::<2>(g, xp, wt, st, out)
        } else {
            avx512::conv_sign::<4>(g, xp, wt, st, out)
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use super::SignStage;
    use sbdnet_kernels::conv::ConvGeom;
    use std::arch::x86_64::*;

    /// Output pixels per pass.
    const P: usize = 4;

    /// `NV` vectors of 16 output channels; `xp` zero-padded.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn conv_sign<const NV: usize>(
        g: &ConvGeom,
        xp: &[f32],
        wt: &[f32],
        st: &SignStage,
        out: &mut [u64],
    ) {
        let co = 16 * NV;
        let (hp, wp, c) = (g.h + 2 * g.pad, g.w + 2 * g.pad, g.cin);
        for b in 0..g.batch {
            let xb = xp[b * hp * wp * c..][..hp * wp * c].as_ptr();
            for oy in 0..g.oh {
                let mut ox = 0;
                while ox < g.ow {
                    let np = (g.ow - ox).min(P);
                    // Pixels past the row's end repeat the last one (computed, not stored).
                    let px: [usize; P] = std::array::from_fn(|p| (ox + p.min(np - 1)) * g.stride * c);
                    let mut acc = [[_mm512_setzero_ps(); NV]; P];
                    for ky in 0..g.kh {
                        let row = xb.add((oy * g.stride + ky) * wp * c);
                        for kx in 0..g.kw {
                            for ci in 0..c {
                                let wrow = wt.as_ptr().add(((ky * g.kw + kx) * c + ci) * co);
                                let wv: [__m512; NV] = std::array::from_fn(|j| _mm512_loadu_ps(wrow.add(16 * j)));
                                for p in 0..P {
                                    let xv = _mm512_set1_ps(*row.add(px[p] + kx * c + ci));
                                    for j in 0..NV {
                                        acc[p][j] = _mm512_fmadd_ps(xv, wv[j], acc[p][j]);
                                    }
                                }
                            }
                        }
                    }
                    for (p, a) in acc.iter().enumerate().take(np) {
                        let mut word = 0u64;
                        for (j, &aj) in a.iter().enumerate() {
                            let o = 16 * j;
                            let mut y = _mm512_add_ps(
                                _mm512_mul_ps(_mm512_loadu_ps(st.scale.as_ptr().add(o)), aj),
                                _mm512_loadu_ps(st.bias.as_ptr().add(o)),
                            );
                            if st.act == 1 {
                                y = _mm512_max_ps(y, _mm512_setzero_ps());
                            } else if st.act == 2 {
                                y = _mm512_min_ps(_mm512_max_ps(y, _mm512_set1_ps(-1.0)), _mm512_set1_ps(1.0));
                            }
                            let gt = _mm512_cmp_ps_mask::<_CMP_GT_OQ>(y, _mm512_loadu_ps(st.t.as_ptr().add(o)));
                            word |= u64::from(!gt) << o;
                        }
                        out[(b * g.oh + oy) * g.ow + ox + p] = word;
                    }
                    ox += P;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sbdnet_kernels::rng::Rng;

    /// The scalar path's arithmetic: valid taps only, in `(ky, kx, ci)` order, then the
    /// stage's `act(scale * s + bias)` per pixel and channel, and the sign words.
    fn plain(g: &ConvGeom, x: &[f32], wt: &[f32], st: &SignStage) -> (Vec<f32>, Vec<u64>) {
        let mut out = vec![0u64; g.batch * g.oh * g.ow];
        let mut ys = vec![0f32; g.batch * g.oh * g.ow * g.cout];
        for b in 0..g.batch {
            for oy in 0..g.oh {
                for ox in 0..g.ow {
                    let mut word = 0u64;
                    for co in 0..g.cout {
                        let mut s = 0.0f32;
                        for ky in 0..g.kh {
                            let iy = (oy * g.stride + ky) as isize - g.pad as isize;
                            if iy < 0 || iy >= g.h as isize {
                                continue;
                            }
                            for kx in 0..g.kw {
                                let ix = (ox * g.stride + kx) as isize - g.pad as isize;
                                if ix < 0 || ix >= g.w as isize {
                                    continue;
                                }
                                for ci in 0..g.cin {
                                    let xv = x[((b * g.h + iy as usize) * g.w + ix as usize) * g.cin + ci];
                                    s = xv.mul_add(wt[((ky * g.kw + kx) * g.cin + ci) * g.cout + co], s);
                                }
                            }
                        }
                        let mut y = st.scale[co] * s + st.bias[co];
                        if st.act == 1 {
                            y = y.max(0.0);
                        } else if st.act == 2 {
                            y = y.clamp(-1.0, 1.0);
                        }
                        word |= u64::from(!(y > st.t[co])) << co;
                        ys[((b * g.oh + oy) * g.ow + ox) * g.cout + co] = y;
                    }
                    out[(b * g.oh + oy) * g.ow + ox] = word;
                }
            }
        }
        (ys, out)
    }

    #[test]
    fn fused_equals_plain_loops_bit_for_bit() {
        if !available() {
            eprintln!("no AVX-512 here (or a forced fallback): nothing to compare");
            return;
        }
        let mut r = Rng::new(7);
        for case in 0..60 {
            let (cin, h, w) = (1 + r.below(3), 1 + r.below(12), 1 + r.below(12));
            let (k, stride): (usize, usize) = ([1, 3, 5][r.below(3)], 1 + r.below(2));
            let pad = r.below(k.div_ceil(2) + 1).min(k - 1);
            let cout = [32, 64][r.below(2)];
            let batch = 1 + r.below(2);
            let Some(g) = ConvGeom::new(batch, h, w, cin, cout, k, stride, pad, 1) else { continue };
            // Some exact zeros in inputs and weights; thresholds near the sums' scale.
            let mut v = |n: usize, sd: f32| -> Vec<f32> {
                (0..n).map(|_| if r.below(8) == 0 { 0.0 } else { r.normal() * sd }).collect()
            };
            let x = v(g.in_len(), 1.0);
            let wt = v(g.weight_len(), 0.5);
            let (scale, bias, mut t) = (v(cout, 1.0), v(cout, 0.3), v(cout, 0.5));
            let act = (case % 3) as u8;
            // Thresholds equal to one pixel's exact value in most channels: a sum rounded
            // in any other way (separate multiply and add, another tap order) flips that bit.
            let (ys, _) = plain(&g, &x, &wt, &SignStage { scale: &scale, bias: &bias, t: &t, act });
            let pixels = ys.len() / cout;
            for (co, tc) in t.iter_mut().enumerate() {
                if r.below(4) != 0 {
                    *tc = ys[r.below(pixels) * cout + co];
                }
            }
            let st = SignStage { scale: &scale, bias: &bias, t: &t, act };
            let mut xp = vec![f32::NAN; padded_len(&g)];
            let mut got = vec![u64::MAX; batch * g.oh * g.ow];
            conv_sign(&g, &x, &wt, &st, &mut xp, &mut got);
            assert_eq!(got, plain(&g, &x, &wt, &st).1, "case {case}: {g:?} act {act}");
        }
    }
}

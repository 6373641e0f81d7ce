//! The first convolution (float weights on float pixels, 32 or 64 output channels) fused
//! with its sign output on AVX-512 (or AVX2 with FMA, 8 lanes per register and fewer pixels
//! per pass): the sums of four output pixels stay in registers, the
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

impl SignStage<'_> {
    /// Whether channel `c`'s output is `+1` for the raw sum `s`: `act(scale * s + bias) > t`
    /// with the arithmetic of the scalar path (multiply, then add; hardtanh as max then min).
    #[allow(clippy::neg_cmp_op_on_partial_ord, clippy::manual_clamp)]
    #[inline(always)]
    pub fn positive(&self, c: usize, s: f32) -> bool {
        let mut y = self.scale[c] * s + self.bias[c];
        if self.act == 1 {
            y = y.max(0.0);
        } else if self.act == 2 {
            y = y.max(-1.0).min(1.0);
        }
        y > self.t[c]
    }
}

/// The sign stage folded into one comparison of the raw sum per channel, and the weights it
/// goes with.
///
/// `act(scale * s + bias) > t`, evaluated in `f32` as the scalar path does, is a monotone
/// function of `s`: rounding to nearest, `max`, `min` and `>` never reverse an order. So for
/// `scale > 0` the set of sums giving `+1` is exactly `{s >= s0}` for one float `s0`, found by
/// bisection over the ordered floats at plan time, and for `scale < 0` it is `{s <= s1}`,
/// i.e. `{-s >= -s1}`: those channels get negated weights, which negates every partial sum
/// exactly (fused multiply-add rounds symmetrically; only the sign of an exact zero can
/// differ, and no comparison sees it). The kernel then needs one `vcmpps` per 16 channels
/// (`!(s >= s0)`, NaN giving `-1` as in the scalar path) instead of multiply, add,
/// activation and compare, and the result is bit-identical to the scalar stage for every
/// sum, infinities included. Channels whose output does not depend on the sum are forced.
#[derive(Clone, Debug)]
pub(crate) struct Folded {
    /// Weights `[tap][co]`, negated for channels with `scale < 0`.
    pub wt: Vec<f32>,
    /// Per channel: output `-1` iff `!(s' >= thr)` (`s'` the sum with those weights).
    pub thr: Vec<f32>,
    /// Channels forced to `-1` (bit set) and to `+1` (bit clear).
    pub one: u64,
    pub zero: u64,
}

/// Order-preserving map of non-NaN floats to integers (-0 just below +0).
fn key(x: f32) -> u32 {
    let b = x.to_bits();
    if b >> 31 == 1 {
        !b
    } else {
        b | 1 << 31
    }
}

fn unkey(k: u32) -> f32 {
    f32::from_bits(if k >> 31 == 1 { k & !(1 << 31) } else { !k })
}

/// Smallest float `s` (from -inf to +inf) with `q(s)` for a non-decreasing `q`; NaN if none.
fn first_true(q: impl Fn(f32) -> bool) -> f32 {
    let (mut lo, mut hi) = (key(f32::NEG_INFINITY), key(f32::INFINITY));
    if q(f32::NEG_INFINITY) {
        return f32::NEG_INFINITY;
    }
    if !q(f32::INFINITY) {
        return f32::NAN;
    }
    // q(lo) false, q(hi) true.
    while hi - lo > 1 {
        let mid = lo + (hi - lo) / 2;
        if q(unkey(mid)) {
            hi = mid;
        } else {
            lo = mid;
        }
    }
    unkey(hi)
}

/// Fold `st` for weights `wt` (`[tap][co]`, `cout <= 64` channels); `None` where a channel
/// cannot be expressed so (a zero or non-finite scale whose output still depends on the sum).
pub(crate) fn fold(wt: &[f32], cout: usize, st: &SignStage) -> Option<Folded> {
    assert!(cout <= 64 && wt.len().is_multiple_of(cout));
    let mut f = Folded { wt: wt.to_vec(), thr: vec![0.0; cout], one: 0, zero: 0 };
    let probes = [f32::NAN, f32::NEG_INFINITY, -f32::MAX, -1.0, -0.0, 0.0, 1.0, f32::MAX, f32::INFINITY];
    for c in 0..cout {
        let p = |s: f32| st.positive(c, s);
        let first = p(probes[0]);
        if probes.iter().all(|&s| p(s) == first) {
            // Monotone in the sum with equal ends and NaN agreeing: constant. (A zero or
            // non-finite scale makes the output depend on the sum's sign and finiteness
            // only, which the probes cover.)
            if first {
                f.zero |= 1 << c;
            } else {
                f.one |= 1 << c;
            }
            continue;
        }
        let neg = st.scale[c] < 0.0;
        let finite = st.scale[c].is_finite() && st.bias[c].is_finite() && st.t[c].is_finite();
        if !finite || st.scale[c] == 0.0 || p(f32::NAN) {
            return None;
        }
        f.thr[c] = if neg { first_true(|s| p(-s)) } else { first_true(p) };
        if neg {
            for w in f.wt.iter_mut().skip(c).step_by(cout) {
                *w = -*w;
            }
        }
    }
    Some(f)
}

/// Whether the fused kernel can run here (AVX-512, or AVX2 with FMA, and no forced
/// fallback).
pub(crate) fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        sbdnet_kernels::kernel_path() == sbdnet_kernels::KernelPath::Avx2
            && (is_x86_feature_detected!("avx512f") || is_x86_feature_detected!("fma"))
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

/// A float affine stage after the first convolution: `act(scale * s + bias)`.
pub(crate) struct AffineStage<'a> {
    pub scale: &'a [f32],
    pub bias: &'a [f32],
    /// 0 none, 1 ReLU, 2 hardtanh.
    pub act: u8,
}

/// Checks shared by both outputs; the padded input in `xp`; each tap's offset from a pixel's
/// first input in the padded image.
fn prepare(g: &ConvGeom, x: &[f32], wt: &[f32], xp: &mut [f32]) -> Vec<usize> {
    assert!(available(), "the fused first convolution needs AVX-512 or AVX2 with FMA");
    assert!(matches!(g.cout, 32 | 64) && g.groups == 1);
    assert!(x.len() >= g.in_len() && wt.len() >= g.weight_len());
    // Every tap of every output pixel lies inside the padded image.
    assert!((g.oh - 1) * g.stride + g.kh <= g.h + 2 * g.pad && (g.ow - 1) * g.stride + g.kw <= g.w + 2 * g.pad);
    pad_input(g, x, xp);
    let wp = g.w + 2 * g.pad;
    (0..g.kh)
        .flat_map(|ky| (0..g.kw).flat_map(move |kx| (0..g.cin).map(move |ci| (ky * wp + kx) * g.cin + ci)))
        .collect()
}

/// Convolution + float affine stage for `g.cout` in {32, 64}, NHWC `f32` output, the sums
/// in registers as in [`conv_sign`]; `max[b]` gets image `b`'s `max |y|` (NaN skipped, as
/// the W1-A8 quantizer finds it). Same arithmetic as the plan's direct convolution and affine
/// pass. Requires [`available`].
pub(crate) fn conv_affine(
    g: &ConvGeom,
    x: &[f32],
    wt: &[f32],
    st: &AffineStage,
    xp: &mut [f32],
    out: &mut [f32],
    max: &mut [f32],
) {
    conv_affine_with(wide512(), g, x, wt, st, xp, out, max)
}

/// Whether the AVX-512 forms run (else the AVX2 ones).
fn wide512() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        is_x86_feature_detected!("avx512f")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// [`conv_affine`] with the AVX-512 form (`wide`, which the CPU must have) or the AVX2 one.
#[allow(clippy::too_many_arguments)]
fn conv_affine_with(
    wide: bool,
    g: &ConvGeom,
    x: &[f32],
    wt: &[f32],
    st: &AffineStage,
    xp: &mut [f32],
    out: &mut [f32],
    max: &mut [f32],
) {
    let taps = prepare(g, x, wt, xp);
    assert!(out.len() >= g.out_len() && max.len() >= g.batch && st.scale.len() >= g.cout && st.bias.len() >= g.cout);
    #[cfg(target_arch = "x86_64")]
    // SAFETY: `available` checked avx512f, or (here) AVX2 and FMA; the slices hold what the
    // loops index (asserted).
    unsafe {
        if !wide {
            return match (g.cout, taps.len()) {
                (32, 9) => avx2::conv_affine::<4, 9, 2>(g, xp, &taps, wt, st, out, max),
                (32, 27) => avx2::conv_affine::<4, 27, 2>(g, xp, &taps, wt, st, out, max),
                (32, _) => avx2::conv_affine::<4, 0, 2>(g, xp, &taps, wt, st, out, max),
                (_, 9) => avx2::conv_affine::<8, 9, 1>(g, xp, &taps, wt, st, out, max),
                (_, 27) => avx2::conv_affine::<8, 27, 1>(g, xp, &taps, wt, st, out, max),
                _ => avx2::conv_affine::<8, 0, 1>(g, xp, &taps, wt, st, out, max),
            };
        }
        match (g.cout, taps.len()) {
            (32, 9) => avx512::conv_affine::<2, 9, 4>(g, xp, &taps, wt, st, out, max),
            (32, 27) => avx512::conv_affine::<2, 27, 4>(g, xp, &taps, wt, st, out, max),
            (32, _) => avx512::conv_affine::<2, 0, 4>(g, xp, &taps, wt, st, out, max),
            (_, 9) => avx512::conv_affine::<4, 9, 4>(g, xp, &taps, wt, st, out, max),
            (_, 27) => avx512::conv_affine::<4, 27, 4>(g, xp, &taps, wt, st, out, max),
            _ => avx512::conv_affine::<4, 0, 4>(g, xp, &taps, wt, st, out, max),
        }
    }
}

/// Convolution + sign for `g.cout` in {32, 64}: one output word per pixel, with the stage
/// folded by [`fold`]. `xp`: scratch of [`padded_len`]; requires [`available`].
pub(crate) fn conv_sign(g: &ConvGeom, x: &[f32], f: &Folded, xp: &mut [f32], out: &mut [u64]) {
    conv_sign_with(wide512(), g, x, f, xp, out)
}

/// [`conv_sign`] with the AVX-512 form (`wide`, which the CPU must have) or the AVX2 one.
fn conv_sign_with(wide: bool, g: &ConvGeom, x: &[f32], f: &Folded, xp: &mut [f32], out: &mut [u64]) {
    let taps = prepare(g, x, &f.wt, xp);
    assert!(out.len() >= g.batch * g.oh * g.ow && f.thr.len() >= g.cout);
    #[cfg(target_arch = "x86_64")]
    // SAFETY: `available` checked avx512f, or (here) AVX2 and FMA; the slices hold what the
    // loops index (asserted).
    unsafe {
        if !wide {
            return match (g.cout, taps.len()) {
                (32, 9) => avx2::conv_sign::<4, 9, 2>(g, xp, &taps, f, out),
                (32, 27) => avx2::conv_sign::<4, 27, 2>(g, xp, &taps, f, out),
                (32, _) => avx2::conv_sign::<4, 0, 2>(g, xp, &taps, f, out),
                (_, 9) => avx2::conv_sign::<8, 9, 1>(g, xp, &taps, f, out),
                (_, 27) => avx2::conv_sign::<8, 27, 1>(g, xp, &taps, f, out),
                _ => avx2::conv_sign::<8, 0, 1>(g, xp, &taps, f, out),
            };
        }
        // 7 pixels per pass (14 accumulators) where rows split evenly so (28 wide: 4-5%
        // faster than 4 on dscnn's first layer), else 4.
        match (g.cout, taps.len(), g.ow.is_multiple_of(7)) {
            (32, 9, true) => avx512::conv_sign::<2, 9, 7>(g, xp, &taps, f, out),
            (32, 9, false) => avx512::conv_sign::<2, 9, 4>(g, xp, &taps, f, out),
            (32, 27, _) => avx512::conv_sign::<2, 27, 4>(g, xp, &taps, f, out),
            (32, _, _) => avx512::conv_sign::<2, 0, 4>(g, xp, &taps, f, out),
            (_, 9, _) => avx512::conv_sign::<4, 9, 4>(g, xp, &taps, f, out),
            (_, 27, _) => avx512::conv_sign::<4, 27, 4>(g, xp, &taps, f, out),
            _ => avx512::conv_sign::<4, 0, 4>(g, xp, &taps, f, out),
        }
    }
}

/// A vector of `f32` lanes for [`tiles`]: the AVX2 (8 lanes) and AVX-512 (16 lanes)
/// registers. The methods are inlined into the kernels, which enable the features.
#[cfg(target_arch = "x86_64")]
trait Lanes: Copy {
    /// Lanes per register.
    const N: usize;
    /// # Safety
    /// The CPU has the register's instruction set (inlined into a function enabling it).
    unsafe fn zero() -> Self;
    /// # Safety
    /// As [`Lanes::zero`]; `p` holds `N` values.
    unsafe fn load(p: *const f32) -> Self;
    /// # Safety
    /// As [`Lanes::zero`].
    unsafe fn splat(v: f32) -> Self;
    /// `a * b + c`, one rounding.
    /// # Safety
    /// As [`Lanes::zero`].
    unsafe fn fmadd(a: Self, b: Self, c: Self) -> Self;
}

#[cfg(target_arch = "x86_64")]
impl Lanes for std::arch::x86_64::__m256 {
    const N: usize = 8;
    #[inline(always)]
    unsafe fn zero() -> Self {
        std::arch::x86_64::_mm256_setzero_ps()
    }
    #[inline(always)]
    unsafe fn load(p: *const f32) -> Self {
        std::arch::x86_64::_mm256_loadu_ps(p)
    }
    #[inline(always)]
    unsafe fn splat(v: f32) -> Self {
        std::arch::x86_64::_mm256_set1_ps(v)
    }
    #[inline(always)]
    unsafe fn fmadd(a: Self, b: Self, c: Self) -> Self {
        std::arch::x86_64::_mm256_fmadd_ps(a, b, c)
    }
}

#[cfg(target_arch = "x86_64")]
impl Lanes for std::arch::x86_64::__m512 {
    const N: usize = 16;
    #[inline(always)]
    unsafe fn zero() -> Self {
        std::arch::x86_64::_mm512_setzero_ps()
    }
    #[inline(always)]
    unsafe fn load(p: *const f32) -> Self {
        std::arch::x86_64::_mm512_loadu_ps(p)
    }
    #[inline(always)]
    unsafe fn splat(v: f32) -> Self {
        std::arch::x86_64::_mm512_set1_ps(v)
    }
    #[inline(always)]
    unsafe fn fmadd(a: Self, b: Self, c: Self) -> Self {
        std::arch::x86_64::_mm512_fmadd_ps(a, b, c)
    }
}

/// The shared loop of both kernel families: `NV` vectors of `V::N` output channels; `KT`
/// taps when known at compile time (0: use `taps.len()`); `P` output pixels per pass; `xp`
/// zero-padded; weights `[tap][co]`. `epi(pixel, sums)` gets each output pixel's sums
/// (pixels numbered `(b * oh + oy) * ow + ox`).
///
/// # Safety
/// The CPU has `V`'s instruction set and FMA (inline only into functions enabling them);
/// `xp`, `taps` and `wt` hold what the geometry indexes (the callers assert it).
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn tiles<V: Lanes, const NV: usize, const KT: usize, const P: usize>(
    g: &ConvGeom,
    xp: &[f32],
    taps: &[usize],
    wt: &[f32],
    mut epi: impl FnMut(usize, &[V; NV]),
) {
    let kt = if KT == 0 { taps.len() } else { KT };
    debug_assert_eq!(kt, taps.len());
    let co = V::N * NV;
    let (hp, wp, c) = (g.h + 2 * g.pad, g.w + 2 * g.pad, g.cin);
    let wt = wt.as_ptr();
    for b in 0..g.batch {
        let xb = xp[b * hp * wp * c..][..hp * wp * c].as_ptr();
        for oy in 0..g.oh {
            let row = xb.add(oy * g.stride * wp * c);
            let mut ox = 0;
            while ox < g.ow {
                let np = (g.ow - ox).min(P);
                // Pixels past the row's end repeat the last one (computed, not stored).
                let px: [*const f32; P] = std::array::from_fn(|p| row.add((ox + p.min(np - 1)) * g.stride * c));
                let mut acc = [[V::zero(); NV]; P];
                for (t, &off) in taps.iter().enumerate().take(kt) {
                    let wv: [V; NV] = std::array::from_fn(|j| V::load(wt.add(t * co + V::N * j)));
                    for p in 0..P {
                        let xv = V::splat(*px[p].add(off));
                        for j in 0..NV {
                            acc[p][j] = V::fmadd(xv, wv[j], acc[p][j]);
                        }
                    }
                }
                for (p, a) in acc.iter().enumerate().take(np) {
                    epi((b * g.oh + oy) * g.ow + ox + p, a);
                }
                ox += P;
            }
        }
    }
}

/// The AVX2 + FMA form of [`avx512`]: `NV` vectors of 8 output channels, the same
/// arithmetic in the same order.
#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::{tiles, AffineStage, Folded};
    use sbdnet_kernels::conv::ConvGeom;
    use std::arch::x86_64::*;

    /// Sign output: one word per pixel from the folded thresholds.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn conv_sign<const NV: usize, const KT: usize, const P: usize>(
        g: &ConvGeom,
        xp: &[f32],
        taps: &[usize],
        f: &Folded,
        out: &mut [u64],
    ) {
        let thr: [__m256; NV] = std::array::from_fn(|j| _mm256_loadu_ps(f.thr.as_ptr().add(8 * j)));
        tiles::<__m256, NV, KT, P>(g, xp, taps, &f.wt, |pix, a| {
            let mut word = 0u64;
            for j in 0..NV {
                let m = _mm256_movemask_ps(_mm256_cmp_ps::<_CMP_NGE_UQ>(a[j], thr[j])) as u64 & 0xff;
                word |= m << (8 * j);
            }
            out[pix] = (word | f.one) & !f.zero;
        });
    }

    /// Float output `act(scale * s + bias)` and each image's `max |y|` into `max[b]`.
    #[target_feature(enable = "avx2,fma")]
    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn conv_affine<const NV: usize, const KT: usize, const P: usize>(
        g: &ConvGeom,
        xp: &[f32],
        taps: &[usize],
        wt: &[f32],
        st: &AffineStage,
        out: &mut [f32],
        max: &mut [f32],
    ) {
        let co = 8 * NV;
        let ld = |v: &[f32]| -> [__m256; NV] { std::array::from_fn(|j| _mm256_loadu_ps(v.as_ptr().add(8 * j))) };
        let (scale, bias) = (ld(st.scale), ld(st.bias));
        let abs = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fff_ffff));
        let per_image = g.oh * g.ow;
        let mut m = _mm256_setzero_ps();
        let mut image = 0;
        tiles::<__m256, NV, KT, P>(g, xp, taps, wt, |pix, a| {
            if pix / per_image != image {
                max[image] = horizontal_max(m);
                m = _mm256_setzero_ps();
                image = pix / per_image;
            }
            for j in 0..NV {
                // NaN -> 0 (ReLU), -1 (hardtanh), as `Act::apply` (see `act256`).
                let y = sbdnet_kernels::act256(_mm256_add_ps(_mm256_mul_ps(scale[j], a[j]), bias[j]), st.act);
                _mm256_storeu_ps(out.as_mut_ptr().add(pix * co + 8 * j), y);
                m = _mm256_max_ps(_mm256_and_ps(y, abs), m);
            }
        });
        max[image] = horizontal_max(m);
    }

    #[inline(always)]
    unsafe fn horizontal_max(m: __m256) -> f32 {
        let mut l = [0f32; 8];
        _mm256_storeu_ps(l.as_mut_ptr(), m);
        l.iter().fold(0.0f32, |a, &b| a.max(b))
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use super::{tiles, AffineStage, Folded};
    use sbdnet_kernels::conv::ConvGeom;
    use std::arch::x86_64::*;

    /// Sign output: one word per pixel from the folded thresholds.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn conv_sign<const NV: usize, const KT: usize, const P: usize>(
        g: &ConvGeom,
        xp: &[f32],
        taps: &[usize],
        f: &Folded,
        out: &mut [u64],
    ) {
        let thr: [__m512; NV] = std::array::from_fn(|j| _mm512_loadu_ps(f.thr.as_ptr().add(16 * j)));
        tiles::<__m512, NV, KT, P>(g, xp, taps, &f.wt, |pix, a| {
            let mut word = 0u64;
            for j in 0..NV {
                word |= u64::from(_mm512_cmp_ps_mask::<_CMP_NGE_UQ>(a[j], thr[j])) << (16 * j);
            }
            out[pix] = (word | f.one) & !f.zero;
        });
    }

    /// Float output `act(scale * s + bias)` (multiply, then add, as the scalar stage) and
    /// each image's `max |y|` (NaN skipped) into `max[b]`.
    #[target_feature(enable = "avx512f")]
    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn conv_affine<const NV: usize, const KT: usize, const P: usize>(
        g: &ConvGeom,
        xp: &[f32],
        taps: &[usize],
        wt: &[f32],
        st: &AffineStage,
        out: &mut [f32],
        max: &mut [f32],
    ) {
        let co = 16 * NV;
        let ld = |v: &[f32]| -> [__m512; NV] { std::array::from_fn(|j| _mm512_loadu_ps(v.as_ptr().add(16 * j))) };
        let (scale, bias) = (ld(st.scale), ld(st.bias));
        let per_image = g.oh * g.ow;
        let mut m = _mm512_setzero_ps();
        let mut image = 0;
        tiles::<__m512, NV, KT, P>(g, xp, taps, wt, |pix, a| {
            if pix / per_image != image {
                max[image] = horizontal_max(m);
                m = _mm512_setzero_ps();
                image = pix / per_image;
            }
            for j in 0..NV {
                // NaN -> 0 (ReLU), -1 (hardtanh), as `Act::apply` (see `act512`).
                let y = sbdnet_kernels::act512(_mm512_add_ps(_mm512_mul_ps(scale[j], a[j]), bias[j]), st.act);
                _mm512_storeu_ps(out.as_mut_ptr().add(pix * co + 16 * j), y);
                // `max(|y|, m)` keeps `m` for NaN: the quantizer's max skips NaN too.
                m = _mm512_max_ps(_mm512_abs_ps(y), m);
            }
        });
        max[image] = horizontal_max(m);
    }

    #[inline(always)]
    unsafe fn horizontal_max(m: __m512) -> f32 {
        let mut l = [0f32; 16];
        _mm512_storeu_ps(l.as_mut_ptr(), m);
        l.iter().fold(0.0f32, |a, &b| a.max(b))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sbdnet_kernels::rng::Rng;

    /// The scalar path's arithmetic: valid taps only, in `(ky, kx, ci)` order, then the
    /// stage's `act(scale * s + bias)` per pixel and channel, and the sign words.
    #[allow(clippy::neg_cmp_op_on_partial_ord)]
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
            eprintln!("no AVX-512 or AVX2 + FMA here (or a forced fallback): nothing to compare");
            return;
        }
        let mut r = Rng::new(7);
        for case in 0..60 {
            let (cin, h, w) = (1 + r.below(3), 1 + r.below(12), 1 + r.below(12));
            let (k, stride): (usize, usize) = ([1, 3, 5][r.below(3)], 1 + r.below(2));
            let pad = r.below(k.div_ceil(2) + 1).min(k - 1);
            let cout = [32, 64][r.below(2)];
            let batch = 1 + r.below(2);
            // The first cases: dscnn's and mobilenet's first layers (7- and 4-pixel passes).
            let (cin, h, w, k, stride, pad, cout) = match case {
                0 => (1, 28, 28, 3, 1, 1, 32),
                1 => (3, 32, 32, 3, 1, 1, 32),
                _ => (cin, h, w, k, stride, pad, cout),
            };
            let Some(g) = ConvGeom::new(batch, h, w, cin, cout, k, stride, pad, 1) else { continue };
            // Some exact zeros in inputs and weights; thresholds near the sums' scale.
            let mut v = |n: usize, sd: f32| -> Vec<f32> {
                (0..n).map(|_| if r.below(8) == 0 { 0.0 } else { r.normal() * sd }).collect()
            };
            let x = v(g.in_len(), 1.0);
            let wt = v(g.weight_len(), 0.5);
            let (mut scale, bias, mut t) = (v(cout, 1.0), v(cout, 0.3), v(cout, 0.5));
            // A zero scale with a sum-dependent output is not folded (the planner keeps the
            // unfused path there); `fold_matches_the_stage_for_every_sum` covers it.
            scale.iter_mut().filter(|s| **s == 0.0).for_each(|s| *s = -0.5);
            let act = (case % 3) as u8;
            // Thresholds equal to one pixel's exact value in most channels: a sum rounded
            // in any other way (separate multiply and add, another tap order) flips that bit.
            let (ys, _) = plain(&g, &x, &wt, &SignStage { scale: &scale, bias: &bias, t: &t, act });
            let pixels = ys.len() / cout;
            for (co, tc) in t.iter_mut().enumerate() {
                if r.below(4) != 0 {
                    // That value (the pixel gives -1) or the float just below it (the pixel is
                    // often the first sum that gives +1: the folded threshold itself).
                    let y = ys[r.below(pixels) * cout + co];
                    *tc = if r.below(2) == 0 { y } else { y.next_down() };
                }
            }
            let st = SignStage { scale: &scale, bias: &bias, t: &t, act };
            let mut xp = vec![f32::NAN; padded_len(&g)];
            let mut got = vec![u64::MAX; batch * g.oh * g.ow];
            let f = fold(&wt, cout, &st).expect("non-zero finite scales fold");
            // Both forms where the CPU has AVX-512 (the AVX2 one is what AVX2-only CPUs run).
            for wide in [false, true].into_iter().filter(|&w| !w || wide512()) {
                got.fill(u64::MAX);
                conv_sign_with(wide, &g, &x, &f, &mut xp, &mut got);
                assert_eq!(got, plain(&g, &x, &wt, &st).1, "case {case}: {g:?} act {act} avx512 {wide}");
            }
        }
    }

    /// The float-output form: every value equal to the scalar path's (sums by fused
    /// multiply-add in tap order, then multiply, add, activation), each image's max |y| equal
    /// to the quantizer's.
    #[test]
    fn affine_output_equals_plain_loops() {
        if !available() {
            eprintln!("no AVX-512 or AVX2 + FMA here (or a forced fallback): nothing to compare");
            return;
        }
        let mut r = Rng::new(9);
        for case in 0..40 {
            let (cin, h, w) = (1 + r.below(3), 1 + r.below(12), 1 + r.below(12));
            let (k, stride): (usize, usize) = ([1, 3, 5][r.below(3)], 1 + r.below(2));
            let pad = r.below(k.div_ceil(2) + 1).min(k - 1);
            let (cout, batch) = ([32, 64][r.below(2)], 1 + r.below(3));
            let (cin, h, w, k, stride, pad, cout) =
                if case == 0 { (3, 32, 32, 3, 1, 1, 32) } else { (cin, h, w, k, stride, pad, cout) };
            let Some(g) = ConvGeom::new(batch, h, w, cin, cout, k, stride, pad, 1) else { continue };
            let mut v =
                |n: usize| -> Vec<f32> { (0..n).map(|_| if r.below(8) == 0 { 0.0 } else { r.normal() }).collect() };
            let (x, wt, scale, bias) = (v(g.in_len()), v(g.weight_len()), v(cout), v(cout));
            let act = (case % 3) as u8;
            let st = SignStage { scale: &scale, bias: &bias, t: &bias, act };
            let (want, _) = plain(&g, &x, &wt, &st);
            let mut xp = vec![f32::NAN; padded_len(&g)];
            let (mut got, mut max) = (vec![f32::NAN; g.out_len()], vec![f32::NAN; batch]);
            let ast = AffineStage { scale: &scale, bias: &bias, act };
            for wide in [false, true].into_iter().filter(|&w| !w || wide512()) {
                got.fill(f32::NAN);
                conv_affine_with(wide, &g, &x, &wt, &ast, &mut xp, &mut got, &mut max);
                assert!(got.iter().zip(&want).all(|(a, b)| a == b), "case {case}: {g:?} act {act}");
                for (b, img) in got.chunks_exact(g.oh * g.ow * cout).enumerate() {
                    let m = img.iter().fold(0.0f32, |m, v| m.max(v.abs()));
                    assert_eq!(max[b], m, "case {case} image {b}");
                }
            }
        }
    }

    #[test]
    #[allow(clippy::neg_cmp_op_on_partial_ord)]
    fn fold_matches_the_stage_for_every_sum() {
        let mut r = Rng::new(11);
        let specials = [0.0, -0.0, 1.0, -1.0, f32::INFINITY, f32::NEG_INFINITY, f32::NAN, f32::MAX, -f32::MAX, 1e-40];
        let mut folded = 0;
        for case in 0..400 {
            let pick = |r: &mut Rng| if r.below(5) == 0 { specials[r.below(specials.len())] } else { r.normal() };
            let (scale, bias, t) = ([pick(&mut r)], [pick(&mut r)], [pick(&mut r)]);
            let st = SignStage { scale: &scale, bias: &bias, t: &t, act: (case % 3) as u8 };
            // One channel, weight 1 (or -1 once folded), so the sum the kernel compares is
            // s (or -s).
            let Some(f) = fold(&[1.0], 1, &st) else {
                assert!(scale[0] == 0.0 || !scale[0].is_finite() || !bias[0].is_finite() || !t[0].is_finite());
                continue;
            };
            folded += 1;
            let mut sums: Vec<f32> = specials.to_vec();
            for _ in 0..200 {
                sums.push(r.normal() * 4.0);
            }
            // Around the threshold (both signs, both directions), where rounding decides.
            let th = f.thr[0];
            if th.is_finite() {
                let mut up = th.abs();
                let mut down = th.abs();
                for _ in 0..8 {
                    up = f32::from_bits(up.to_bits() + 1);
                    down = f32::from_bits(down.to_bits().saturating_sub(1));
                    sums.extend([up, -up, down, -down]);
                }
            }
            for &s in &sums {
                let s_k = s * f.wt[0]; // exact: the weight is +-1
                let bit = !(s_k >= th);
                let bit = (bit || f.one & 1 == 1) && f.zero & 1 == 0;
                assert_eq!(bit, !st.positive(0, s), "case {case}: s {s} stage {scale:?} {bias:?} {t:?} thr {th}");
            }
        }
        assert!(folded > 300, "only {folded} of 400 stages folded");
    }
}

//! Bit-packed W1A1 kernels: binary weights and binary activations, XNOR/XOR + popcount.
//!
//! # Contracts
//!
//! - **Bit meaning** (as in Larq Compute Engine): a binary value `+1` is bit `0`, `-1` is
//!   bit `1`. So the product of two binary values is `+1` exactly when their bits agree, and
//!   over `n` bit pairs `sum a_i * b_i = n - 2 * popcount(a XOR b)`.
//! - **Bit order**: the channels of one NHWC pixel are packed into [`words`]`(C)` =
//!   `ceil(C / 64)` `u64` words; channel `c` is bit `c % 64` of word `c / 64`. A packed
//!   activation tensor is `[B][H][W][words(C)]`, packed OHWI weights are
//!   `[Cout][KH][KW][words(Cin)]`, packed depthwise weights are tap-major `[KH*KW][words(C)]`.
//! - **Padding bits** (bits `C..64*words(C)` of the last word of every pixel) are `0` in every
//!   packed tensor: the packers write them so and the packed-output kernels mask them. The
//!   kernels rely on it: `0 XOR 0 = 0`, so padding bits add nothing to a popcount, and the dot
//!   product uses the true channel count `C`, not `64 * words(C)`, as its bit count.
//! - **Zero padding of a convolution** is reproduced exactly as in training, where a padded
//!   position holds the float `0`, so a padded tap contributes `0`, not `+-1`. A packed tensor
//!   has no third value, so the kernels skip padded taps and count the valid ones: with
//!   `n_valid(oy, ox)` the number of kernel taps inside the image,
//!
//!   ```text
//!   dot(oy, ox, co) = Cin * n_valid(oy, ox) - 2 * sum_{valid taps} popcount(x_tap XOR w_tap)
//!   ```
//!
//!   which equals the float convolution of the `+-1` values with zero padding. The count of
//!   valid taps therefore differs at the borders (4, 6 or 9 for a 3x3 kernel with padding 1).
//! - **Packing rules**: weights by sign with `sign(0) = +1` ([`pack_signs`]: bit = `x < 0`,
//!   so `-0.0` and `0.0` are `+1`); activations by the training rule `a = +1 iff x > t_c`
//!   ([`pack_thresholded`]: bit = `0` iff `x > t[c]`, so `x == t` and NaN give `-1`).
//! - **Outputs**: the integer dot products (`i32`, exact), or packed sign bits through a
//!   per-channel integer threshold [`SignThreshold`] (BatchNorm + sign folded, see
//!   [`fold_bn_sign`]): output bit = `0` iff `s > thr` (or `s < thr` for a negative scale).
//!
//! # Kernels
//!
//! | op | reference | optimized |
//! |----|-----------|-----------|
//! | dense binary convolution (any k, stride, padding; groups = 1) | [`reference::bconv_forward`] | [`bconv_forward`] |
//! | depthwise 3x3 (any stride, padding 0..=2), i32 out | [`reference::bdw_forward`] | [`bdw_forward`] |
//! | depthwise 3x3, packed out through thresholds | [`reference::bdw_forward_packed`] | [`bdw_forward_packed`] |
//!
//! The optimized dense kernel walks, per output pixel and kernel row, the contiguous run of
//! `valid kx * words(Cin)` words that the input row and the weight row share, four output
//! channels at a time. The depthwise kernel works on 64 channels at once: one XNOR per tap
//! gives a 64-lane vector of "agree" flags, a carry-save adder tree adds the (up to 9) vectors
//! into 4-bit counters held in four `u64` bit planes, and the result is `2 * agree - n_valid`
//! (or a bit-sliced comparison with the threshold, for packed output).
//!
//! Implementations ([`BinaryImpl`]) are chosen at run time from [`crate::kernel_path`]:
//! `reference` runs the `+-1` loops, `portable` the packed code with `u64::count_ones` for the
//! baseline target, and `avx2` the packed code compiled with the `POPCNT` instruction
//! ([`BinaryImpl::Popcnt`], measured faster here than the AVX2 `vpshufb` nibble-table popcount
//! [`BinaryImpl::Avx2Shuffle`] for these run lengths; both are kept and tested), or
//! [`BinaryImpl::Avx512`] where the CPU has AVX-512 (the depthwise kernel then takes 8
//! pixels per register). Work is split over output rows with rayon (batch 1 included) when
//! the pool has more than one thread.
//!
//! ```
//! use sbdnet_kernels::binary::{bconv_forward, pack_conv_weights, pack_signs, words};
//! use sbdnet_kernels::conv::ConvGeom;
//! // One 2x2 image with 3 channels, a 1x1 convolution to 1 output channel.
//! let g = ConvGeom::new(1, 2, 2, 3, 1, 1, 1, 0, 1).unwrap();
//! let x = [1.0, -1.0, 1.0, /**/ 1.0, 1.0, 1.0, /**/ -1.0, -1.0, -1.0, /**/ 1.0, -1.0, -1.0f32];
//! let w = [1.0, 1.0, -1.0f32];
//! let mut xp = vec![0u64; 4 * words(3)];
//! pack_signs(&x, 3, &mut xp);
//! assert_eq!(xp[0], 0b010); // channel 1 is -1: bit 1 set
//! let mut wp = vec![0u64; words(3)];
//! pack_conv_weights(&g, &w, &mut wp);
//! let mut y = [0i32; 4];
//! bconv_forward(&g, &xp, &wp, &mut y);
//! assert_eq!(y, [-1, 1, -1, 1]);
//! ```

use crate::conv::ConvGeom;
use crate::dispatch::{kernel_path, KernelPath};
use std::sync::OnceLock;

mod conv;
mod depthwise;
pub mod pointwise;
pub mod reference;
pub mod sparse;
#[cfg(target_arch = "x86_64")]
mod x86_64;

/// Bits per packed word.
pub const WORD_BITS: usize = 64;

/// Packed words per pixel of `c` channels: `ceil(c / 64)`.
#[inline]
pub fn words(c: usize) -> usize {
    c.div_ceil(WORD_BITS)
}

/// Mask of the valid bits of word `wi` of a pixel of `c` channels (all ones except in the last
/// word when `c % 64 != 0`).
#[inline]
pub fn word_mask(c: usize, wi: usize) -> u64 {
    let valid = c.saturating_sub(wi * WORD_BITS).min(WORD_BITS);
    if valid == WORD_BITS {
        u64::MAX
    } else {
        (1u64 << valid) - 1
    }
}

/// Pack rows of `c` values by sign, the weight rule `sign(0) = +1`: bit = `1` iff `x < 0`.
/// `x` holds `rows * c` values (for example `+-1` floats, or latent weights), `out` at least
/// `rows * words(c)` words; padding bits are written `0`.
pub fn pack_signs(x: &[f32], c: usize, out: &mut [u64]) {
    pack_rows(x, c, out, |_, v| v < 0.0)
}

/// Pack rows of `c` activations by the training rule `a = +1 iff x > t[ch]`: bit = `0` iff
/// `x > t[ch]` (so `x == t` and NaN give bit `1`, i.e. `-1`). `t` holds `c` thresholds.
pub fn pack_thresholded(x: &[f32], c: usize, t: &[f32], out: &mut [u64]) {
    let t = &t[..c];
    #[cfg(target_arch = "x86_64")]
    if BinaryImpl::current() == BinaryImpl::Avx512 {
        assert!(c > 0 && x.len().is_multiple_of(c), "pack: {} values are not rows of {c}", x.len());
        assert!(out.len() >= x.len() / c * words(c), "pack: output too short");
        // SAFETY: AVX-512 F is present (BinaryImpl::Avx512); lengths checked above.
        unsafe { pack_thresholded_avx512(x, c, t, out) };
        return;
    }
    pack_thresholded_scalar(x, c, t, out);
}

/// [`pack_thresholded`] one value at a time (the reference for the AVX-512 form).
pub fn pack_thresholded_scalar(x: &[f32], c: usize, t: &[f32], out: &mut [u64]) {
    let t = &t[..c];
    // Written as `!(x > t)`, not `x <= t`: NaN must give -1 as in training.
    #[allow(clippy::neg_cmp_op_on_partial_ord)]
    pack_rows(x, c, out, |ch, v| !(v > t[ch]))
}

/// [`pack_thresholded`] 16 channels per comparison (`vcmpps` with "not greater than,
/// unordered", true for NaN as `!(x > t)` is), four comparisons' masks per 64-bit word.
/// Lanes past `c` are masked off and give 0 bits.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn pack_thresholded_avx512(x: &[f32], c: usize, t: &[f32], out: &mut [u64]) {
    use std::arch::x86_64::*;
    let wd = words(c);
    for (r, xr) in x.chunks_exact(c).enumerate() {
        for wi in 0..wd {
            let mut bits = 0u64;
            for q in 0..4 {
                let lo = wi * WORD_BITS + 16 * q;
                if lo >= c {
                    break;
                }
                let n = (c - lo).min(16);
                let m: __mmask16 = crate::lanes16(n);
                let v = _mm512_maskz_loadu_ps(m, xr.as_ptr().add(lo));
                let th = _mm512_maskz_loadu_ps(m, t.as_ptr().add(lo));
                let k = _mm512_mask_cmp_ps_mask::<_CMP_NGT_UQ>(m, v, th);
                bits |= u64::from(k) << (16 * q);
            }
            *out.get_unchecked_mut(r * wd + wi) = bits;
        }
    }
}

#[inline(always)]
fn pack_rows(x: &[f32], c: usize, out: &mut [u64], neg: impl Fn(usize, f32) -> bool) {
    assert!(c > 0 && x.len().is_multiple_of(c), "pack: {} values are not rows of {c}", x.len());
    let wd = words(c);
    let rows = x.len() / c;
    assert!(out.len() >= rows * wd, "pack: output holds {} words, {} needed", out.len(), rows * wd);
    for (xr, or) in x.chunks_exact(c).zip(out.chunks_exact_mut(wd)) {
        for (wi, o) in or.iter_mut().enumerate() {
            let lo = wi * WORD_BITS;
            let mut bits = 0u64;
            for (b, &v) in xr[lo..(lo + WORD_BITS).min(c)].iter().enumerate() {
                bits |= u64::from(neg(lo + b, v)) << b;
            }
            *o = bits;
        }
    }
}

/// Unpack rows of `c` channels into `+-1` floats (`out` holds `rows * c` values, `packed` at
/// least `rows * words(c)` words). Padding bits are ignored.
pub fn unpack(packed: &[u64], c: usize, out: &mut [f32]) {
    assert!(c > 0 && out.len().is_multiple_of(c));
    let wd = words(c);
    assert!(packed.len() >= out.len() / c * wd);
    for (or, pr) in out.chunks_exact_mut(c).zip(packed.chunks_exact(wd)) {
        for (ch, o) in or.iter_mut().enumerate() {
            *o = if (pr[ch / WORD_BITS] >> (ch % WORD_BITS)) & 1 == 1 { -1.0 } else { 1.0 };
        }
    }
}

/// Pack OHWI float weights `[cout][kh][kw][cin]` (groups = 1) by sign (`sign(0) = +1`) into
/// `[cout][kh][kw][words(cin)]`, once when a model is loaded. `out`: [`conv_weight_words`].
pub fn pack_conv_weights(g: &ConvGeom, w: &[f32], out: &mut [u64]) {
    assert_eq!(g.groups, 1, "binary dense convolution needs groups == 1");
    pack_signs(&w[..g.weight_len()], g.cin, out)
}

/// Words of packed dense weights: `cout * kh * kw * words(cin)`.
pub fn conv_weight_words(g: &ConvGeom) -> usize {
    g.cout * g.kh * g.kw * words(g.cin)
}

/// Pack depthwise OHWI float weights `[c][kh][kw][1]` by sign into tap-major
/// `[kh*kw][words(c)]`. `out`: [`dw_weight_words`].
pub fn pack_depthwise_weights(g: &ConvGeom, w: &[f32], out: &mut [u64]) {
    assert!(g.groups == g.cin && g.cin == g.cout, "not a depthwise geometry: {g:?}");
    let (c, taps) = (g.cin, g.kh * g.kw);
    let wd = words(c);
    let out = &mut out[..taps * wd];
    out.fill(0);
    for ch in 0..c {
        for t in 0..taps {
            if w[ch * taps + t] < 0.0 {
                out[t * wd + ch / WORD_BITS] |= 1 << (ch % WORD_BITS);
            }
        }
    }
}

/// Words of packed depthwise weights: `kh * kw * words(c)`.
pub fn dw_weight_words(g: &ConvGeom) -> usize {
    g.kh * g.kw * words(g.cin)
}

/// Packed activation words of the input of `g`: `batch * h * w * words(cin)`.
pub fn in_words(g: &ConvGeom) -> usize {
    g.batch * g.h * g.w * words(g.cin)
}

/// Packed activation words of the output of `g`: `batch * oh * ow * words(cout)`.
pub fn out_words(g: &ConvGeom) -> usize {
    g.out_rows() * words(g.cout)
}

/// Per-channel integer threshold that maps an integer dot product `s` to a binary output:
/// `+1` (bit `0`) iff `s > thr` when `!negative`, iff `s < thr` when `negative`.
/// Built by [`fold_bn_sign`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SignThreshold {
    /// The integer threshold.
    pub thr: i32,
    /// The folded scale is negative: the comparison is flipped.
    pub negative: bool,
}

impl SignThreshold {
    /// The output bit for dot product `s` (`false` = `+1`).
    #[inline]
    pub fn bit(self, s: i32) -> bool {
        let pos = if self.negative { s < self.thr } else { s > self.thr };
        !pos
    }
}

/// Fold `alpha` (the binary weights' scale), BatchNorm (`gamma`, `beta`, running `mean`,
/// `sigma = sqrt(var + eps)`) and the next binary activation's threshold `t` into one
/// [`SignThreshold`] on the integer dot product `s` of a binary layer. `alpha >= 0`,
/// `sigma > 0`.
///
/// Derivation. The training graph computes `z = alpha * s`, then
/// `y = gamma * (z - mean) / sigma + beta`, then `a = +1 iff y > t`. Write
/// `y = A * s + B` with `A = gamma * alpha / sigma` and `B = beta - gamma * mean / sigma`:
///
/// ```text
/// y > t  <=>  A * s > t - B
///        <=>  s > (t - B) / A = (t - beta) * sigma / (gamma * alpha) + mean / alpha   if A > 0
///        <=>  s < (t - B) / A                                                           if A < 0
///        <=>  B > t  (a constant: the same output for every s)                          if A = 0
/// ```
///
/// `A` has the sign of `gamma * alpha` (`sigma > 0`). For an integer `s` and a real `tau`,
/// `s > tau <=> s > floor(tau)` and `s < tau <=> s < ceil(tau)`, so the stored threshold is
/// `floor(tau)` (`A > 0`) or `ceil(tau)` with `negative` set (`A < 0`). When `A = 0`
/// (`gamma == 0` or `alpha == 0`) the output is constant: `thr = i32::MIN` (always `+1`,
/// since `s > i32::MIN` for every reachable `s`) if `B > t`, else `thr = i32::MAX` (always
/// `-1`). A threshold beyond the `i32` range saturates, which keeps the comparison's answer
/// for every reachable `s` (`|s| <= Cin * KH * KW`). The arithmetic is done in `f64`; on an
/// exact tie of the float graph (`y == t` up to rounding) training's own `f32` rounding
/// decides, which is the one place the folded threshold may differ from training.
pub fn fold_bn_sign(alpha: f32, gamma: f32, beta: f32, mean: f32, sigma: f32, t: f32) -> SignThreshold {
    let (alpha, gamma, beta, mean, sigma, t) =
        (alpha as f64, gamma as f64, beta as f64, mean as f64, sigma as f64, t as f64);
    let a = gamma * alpha / sigma;
    let b = beta - gamma * mean / sigma;
    if a == 0.0 || !a.is_finite() {
        let thr = if b > t { i32::MIN } else { i32::MAX };
        return SignThreshold { thr, negative: false };
    }
    let tau = (t - b) / a;
    if a > 0.0 {
        // `as` saturates (and maps NaN to 0; NaN parameters have no meaningful fold).
        SignThreshold { thr: tau.floor() as i32, negative: false }
    } else {
        SignThreshold { thr: tau.ceil() as i32, negative: true }
    }
}

/// Threshold rows of `c` integer dot products into packed sign bits (`out`: `rows *
/// words(c)` words, padding bits `0`): the output transform of a dense binary convolution
/// whose next layer is binary.
pub fn threshold_pack(y: &[i32], c: usize, thr: &[SignThreshold], out: &mut [u64]) {
    assert!(c > 0 && y.len().is_multiple_of(c) && thr.len() >= c);
    let wd = words(c);
    assert!(out.len() >= y.len() / c * wd);
    for (yr, or) in y.chunks_exact(c).zip(out.chunks_exact_mut(wd)) {
        or.fill(0);
        for (ch, (&s, &t)) in yr.iter().zip(thr).enumerate() {
            or[ch / WORD_BITS] |= u64::from(t.bit(s)) << (ch % WORD_BITS);
        }
    }
}

/// Which implementation a binary kernel runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BinaryImpl {
    /// Unpack to `+-1` and run plain loops ([`reference`](mod@reference)).
    Reference,
    /// Packed kernels with `u64::count_ones`, compiled for the baseline target.
    Portable,
    /// Packed kernels compiled with the `POPCNT` instruction (x86_64 with `popcnt`).
    Popcnt,
    /// Packed kernels with an AVX2 `vpshufb` nibble-table popcount for runs of 4+ words
    /// (x86_64 with `avx2` and `popcnt`).
    Avx2Shuffle,
    /// `Popcnt` where the CPU also has AVX-512 (`avx512f`, `avx512vpopcntdq`): the packed
    /// depthwise kernel runs on 8 pixels per 512-bit register with ternary-logic adders and
    /// masked loads for the borders; the other kernels run as `Popcnt`.
    Avx512,
}

impl BinaryImpl {
    /// Whether this CPU can run the implementation.
    pub fn available(self) -> bool {
        match self {
            BinaryImpl::Reference | BinaryImpl::Portable => true,
            #[cfg(target_arch = "x86_64")]
            BinaryImpl::Popcnt => is_x86_feature_detected!("popcnt"),
            #[cfg(target_arch = "x86_64")]
            BinaryImpl::Avx2Shuffle => is_x86_feature_detected!("avx2") && is_x86_feature_detected!("popcnt"),
            #[cfg(target_arch = "x86_64")]
            BinaryImpl::Avx512 => {
                is_x86_feature_detected!("avx512f")
                    && is_x86_feature_detected!("avx512vpopcntdq")
                    && is_x86_feature_detected!("popcnt")
            }
            #[cfg(not(target_arch = "x86_64"))]
            _ => false,
        }
    }

    /// The implementation for this process: from [`kernel_path`] (`SBDNET_KERNEL`), with the
    /// `avx2` path mapped to [`BinaryImpl::Avx512`] where the CPU has it, else to
    /// [`BinaryImpl::Popcnt`] (faster here than [`BinaryImpl::Avx2Shuffle`]) when available.
    pub fn current() -> BinaryImpl {
        static IMPL: OnceLock<BinaryImpl> = OnceLock::new();
        *IMPL.get_or_init(|| match kernel_path() {
            KernelPath::Reference => BinaryImpl::Reference,
            KernelPath::Portable => BinaryImpl::Portable,
            KernelPath::Avx2 if BinaryImpl::Avx512.available() => BinaryImpl::Avx512,
            KernelPath::Avx2 if BinaryImpl::Popcnt.available() => BinaryImpl::Popcnt,
            KernelPath::Avx2 => BinaryImpl::Portable,
        })
    }
}

fn check_dense(g: &ConvGeom, x: &[u64], w: &[u64], out_len: usize) {
    assert_eq!(g.groups, 1, "binary dense convolution needs groups == 1");
    assert!(x.len() >= in_words(g), "bconv: input holds {} words, {} needed", x.len(), in_words(g));
    assert!(w.len() >= conv_weight_words(g), "bconv: weights hold {} words", w.len());
    assert!(out_len >= g.out_len(), "bconv: output holds {out_len} values, {} needed", g.out_len());
    assert!(g.cin * g.kh * g.kw <= i32::MAX as usize, "bconv: dot products overflow i32");
}

fn check_dw(g: &ConvGeom, x: &[u64], w: &[u64]) {
    assert!(g.groups == g.cin && g.cin == g.cout, "not a depthwise geometry: {g:?}");
    assert!(g.kh == 3 && g.kw == 3, "binary depthwise kernels are 3x3");
    assert!(x.len() >= in_words(g), "bdw: input holds {} words, {} needed", x.len(), in_words(g));
    assert!(w.len() >= dw_weight_words(g), "bdw: weights hold {} words", w.len());
}

/// Dense binary convolution (groups = 1, any square kernel, stride and zero padding):
/// `out[b,oy,ox,co] = sum over valid taps and ci of x * w` in `+-1` arithmetic, i.e.
/// `Cin * n_valid - 2 * popcount(XOR)`. `x`: packed `[B][H][W][words(Cin)]`; `w`: packed
/// `[Cout][KH][KW][words(Cin)]`; `out`: NHWC `i32`, [`ConvGeom::out_len`] values.
pub fn bconv_forward(g: &ConvGeom, x: &[u64], w: &[u64], out: &mut [i32]) {
    bconv_forward_with(BinaryImpl::current(), g, x, w, out)
}

/// [`bconv_forward`] with an explicit implementation (it must be [`BinaryImpl::available`]).
pub fn bconv_forward_with(imp: BinaryImpl, g: &ConvGeom, x: &[u64], w: &[u64], out: &mut [i32]) {
    check_dense(g, x, w, out.len());
    assert!(imp.available(), "{imp:?} is not available on this CPU");
    match imp {
        BinaryImpl::Reference => reference::bconv_forward(g, x, w, out),
        _ => conv::bconv_forward(imp, g, x, w, out),
    }
}

/// Binary depthwise 3x3 (any stride, zero padding `pad <= 2`), integer output:
/// `out[b,oy,ox,c] = sum over valid taps of x * w` in `+-1` arithmetic, i.e.
/// `2 * agree - n_valid`. `x`: packed `[B][H][W][words(C)]`; `w`: packed tap-major
/// `[9][words(C)]` ([`pack_depthwise_weights`]); `out`: NHWC `i32`.
pub fn bdw_forward(g: &ConvGeom, x: &[u64], w: &[u64], out: &mut [i32]) {
    bdw_forward_with(BinaryImpl::current(), g, x, w, out)
}

/// [`bdw_forward`] with an explicit implementation.
pub fn bdw_forward_with(imp: BinaryImpl, g: &ConvGeom, x: &[u64], w: &[u64], out: &mut [i32]) {
    check_dw(g, x, w);
    assert!(out.len() >= g.out_len());
    assert!(imp.available(), "{imp:?} is not available on this CPU");
    match imp {
        BinaryImpl::Reference => reference::bdw_forward(g, x, w, out),
        _ => depthwise::bdw_forward(imp, g, x, w, out),
    }
}

/// A per-channel affine applied to integer sums as a kernel writes them (the depthwise and
/// pointwise `*_affine` forms): `y = act(scale[c] * s + bias[c])` in `f32` (multiply, round,
/// add, round: no fused multiply-add), `act` as [`crate::act512`].
#[derive(Clone, Copy, Debug)]
pub struct SumAffine<'a> {
    /// Per-channel scale.
    pub scale: &'a [f32],
    /// Per-channel bias.
    pub bias: &'a [f32],
    /// Activation code.
    pub act: u8,
}

impl SumAffine<'_> {
    /// The affine of the sums `s` (as `f32`) of channels `c0..` in lanes `m` (others 0).
    ///
    /// # Safety
    /// AVX-512 F enabled where inlined; `scale` and `bias` cover the lanes of `m`.
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    pub(crate) unsafe fn apply16(
        &self,
        c0: usize,
        m: std::arch::x86_64::__mmask16,
        s: std::arch::x86_64::__m512,
    ) -> std::arch::x86_64::__m512 {
        use std::arch::x86_64::*;
        let sc = _mm512_maskz_loadu_ps(m, self.scale.as_ptr().add(c0));
        let b = _mm512_maskz_loadu_ps(m, self.bias.as_ptr().add(c0));
        crate::act512(_mm512_add_ps(_mm512_mul_ps(sc, s), b), self.act)
    }
}

/// [`bdw_forward`] followed by a per-channel affine, written as `f32` in one pass (no integer
/// buffer), where the process runs [`BinaryImpl::Avx512`]; returns `false` (writing nothing)
/// elsewhere, and the caller runs [`bdw_forward`] and its own affine. The same values as
/// `act(scale[c] * (s as f32) + bias[c])` on the integer sums `s`.
pub fn bdw_forward_affine(g: &ConvGeom, x: &[u64], w: &[u64], aff: &SumAffine, out: &mut [f32]) -> bool {
    #[cfg(target_arch = "x86_64")]
    if BinaryImpl::current() == BinaryImpl::Avx512 {
        check_dw(g, x, w);
        assert!(out.len() >= g.out_len() && aff.scale.len() >= g.cin && aff.bias.len() >= g.cin);
        depthwise::bdw_forward_affine(g, x, w, aff, out);
        return true;
    }
    let _ = (g, x, w, aff, out);
    false
}

/// Per-channel thresholds of [`bdw_forward_packed`], prepared once (at load) from
/// [`SignThreshold`]s: for every possible count of valid taps `v` (0..=9) and every word of
/// 64 channels, the bound on the agree count `a` as 4 bit planes, so the comparison runs
/// bit-sliced on 64 channels at once.
///
/// With `s = 2a - v`: `s > thr <=> a >= floor((thr + v) / 2) + 1` and
/// `s < thr <=> a <= ceil((thr + v) / 2) - 1 <=> !(a >= ceil((thr + v) / 2))`. Each lane
/// stores its bound `K` (clamped to `0..=v+1`, which keeps the answer since `0 <= a <= v`)
/// and the kernel computes `ge = (a >= K)`; the output bit (`1` = `-1`) is `ge XOR !negative`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DwThresholds {
    c: usize,
    /// `[v][word][plane]`: bit planes of the bound `K` for `v` valid taps.
    planes: Vec<[u64; 4]>,
    /// `[word]`: lanes whose output bit is `ge XOR 1` (positive scale).
    not_negative: Vec<u64>,
    /// `[word][plane]`: plane `plane` of the bound for `v = 0..=9` valid taps at entry `v`
    /// (entries 10..16 zero), a lookup table the AVX-512 kernel indexes per pixel.
    by_taps: Vec<[u64; 16]>,
    /// `by_taps` of word 0 in 32-bit entries (for at most 32 channels).
    by_taps32: Vec<[u32; 16]>,
    /// The thresholds themselves (for the reference).
    thr: Vec<SignThreshold>,
}

impl DwThresholds {
    /// Prepare thresholds for `thr.len()` channels.
    pub fn new(thr: &[SignThreshold]) -> Self {
        let c = thr.len();
        let wd = words(c);
        let mut planes = vec![[0u64; 4]; 10 * wd];
        let mut not_negative = vec![0u64; wd];
        for (ch, t) in thr.iter().enumerate() {
            let (wi, bit) = (ch / WORD_BITS, ch % WORD_BITS);
            if !t.negative {
                not_negative[wi] |= 1 << bit;
            }
            for v in 0..=9i64 {
                let sum = t.thr as i64 + v;
                let k = if t.negative { sum.div_euclid(2) + sum.rem_euclid(2) } else { sum.div_euclid(2) + 1 };
                let k = k.clamp(0, v + 1) as u64;
                for (p, plane) in planes[v as usize * wd + wi].iter_mut().enumerate() {
                    *plane |= ((k >> p) & 1) << bit;
                }
            }
        }
        let mut by_taps = vec![[0u64; 16]; wd * 4];
        for wi in 0..wd {
            for p in 0..4 {
                for v in 0..=9 {
                    by_taps[wi * 4 + p][v] = planes[v * wd + wi][p];
                }
            }
        }
        let by_taps32 = (0..4).map(|p| std::array::from_fn(|v| by_taps.get(p).map_or(0, |t| t[v] as u32))).collect();
        DwThresholds { c, planes, not_negative, by_taps, by_taps32, thr: thr.to_vec() }
    }

    /// Channels.
    pub fn channels(&self) -> usize {
        self.c
    }

    /// The per-channel thresholds.
    pub fn thresholds(&self) -> &[SignThreshold] {
        &self.thr
    }
}

/// Binary depthwise 3x3 fused with its output transform: packed sign bits
/// `out bit = thr[c].bit(s)` for the integer sum `s` of [`bdw_forward`], computed bit-sliced
/// without forming `s`. `out`: [`out_words`] words; padding bits are written `0`.
pub fn bdw_forward_packed(g: &ConvGeom, x: &[u64], w: &[u64], thr: &DwThresholds, out: &mut [u64]) {
    bdw_forward_packed_with(BinaryImpl::current(), g, x, w, thr, out)
}

/// [`bdw_forward_packed`] with an explicit implementation.
pub fn bdw_forward_packed_with(
    imp: BinaryImpl,
    g: &ConvGeom,
    x: &[u64],
    w: &[u64],
    thr: &DwThresholds,
    out: &mut [u64],
) {
    check_dw(g, x, w);
    assert_eq!(thr.c, g.cin, "thresholds for {} channels, layer has {}", thr.c, g.cin);
    assert!(out.len() >= out_words(g));
    assert!(imp.available(), "{imp:?} is not available on this CPU");
    match imp {
        BinaryImpl::Reference => reference::bdw_forward_packed(g, x, w, &thr.thr, out),
        _ => depthwise::bdw_forward_packed(imp, g, x, w, thr, out),
    }
}

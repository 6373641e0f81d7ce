//! The W1-A8 kernels for AVX2 machines without AVX-512 (the AMD Zen 3 this project's
//! benchmarks now run on): a depthwise kernel with sign-apply (`vpsignw`: `x`, `-x` or `0`
//! per lane from the weight `+1`, `-1`, `0`) and 16-bit additions, a pointwise kernel that
//! adds, per output channel, a list of transposed input rows over 64 pixels at a time
//! ([`Lists`], [`pw_rows`]), both with the layer's affine and per-channel maxima applied as
//! they store, and the quantization passes written with explicit intrinsics (the
//! compiler's vectorization of the portable loops left the per-channel maximum at one
//! element per cycle).
//!
//! Every function here gives exactly the values of the portable path: the same integer sums,
//! the same `f32` operations in the same order in the affine, the same rounding and clamping
//! in the quantization (`round half to even`, NaN to `-127`).

#![allow(unsafe_op_in_unsafe_fn)]

use super::Out;
use sbdnet_kernels::conv::ConvGeom;
use std::arch::x86_64::*;

/// Output pixels per pass of the depthwise kernel (accumulator registers).
const SEG: usize = 8;

/// Whether these kernels can run here: the AVX2 path (no forced fallback) on a CPU with AVX2
/// and FMA. Plans choose them where the AVX-512 kernels cannot run; tests run them anywhere
/// this holds.
pub fn available() -> bool {
    sbdnet_kernels::kernel_path() == sbdnet_kernels::KernelPath::Avx2
        && is_x86_feature_detected!("avx2")
        && is_x86_feature_detected!("fma")
}

/// Elements [`dw_image`] may read past the padded image: the last pass's pixels past the
/// row's end and the last block's lanes past the channels.
pub fn dw_slack(g: &ConvGeom) -> usize {
    SEG * g.stride * g.cin + 16
}

/// `[0 or -1; 8]` for the first `n` of 8 lanes.
#[inline(always)]
unsafe fn lane_mask(n: usize) -> __m256i {
    let idx = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    _mm256_cmpgt_epi32(_mm256_set1_epi32(n as i32), idx)
}

/// The epilogue's per-channel vectors for channels `c..c + 8` (lanes `m`): scale, bias and
/// activation scale.
#[inline(always)]
unsafe fn affine8(out: &Out, c: usize, m: __m256i) -> [__m256; 3] {
    match &out.ep {
        None => [_mm256_setzero_ps(); 3],
        Some(e) => [
            _mm256_maskload_ps(e.scale.as_ptr().add(c), m),
            _mm256_maskload_ps(e.bias.as_ptr().add(c), m),
            match e.kc {
                Some(k) => _mm256_maskload_ps(k.as_ptr().add(c), m),
                None => _mm256_set1_ps(e.k),
            },
        ],
    }
}

/// Write 8 sums (lanes `m`, `full` when all 8) at `y[at..]`: as `f32`, or through the
/// epilogue (`act(scale * (k * v) + bias)`, the plan's affine pass's operations in order)
/// with the running `max |y|` in `mx` (NaN skipped: `max_ps` keeps its second operand).
#[inline(always)]
unsafe fn emit8(out: &mut Out, mx: &mut __m256, at: usize, sb: [__m256; 3], m: __m256i, full: bool, sum: __m256i) {
    let v = _mm256_cvtepi32_ps(sum);
    let v = match &out.ep {
        None => v,
        Some(e) => {
            let [s, b, k] = sb;
            let t = sbdnet_kernels::act256(_mm256_add_ps(_mm256_mul_ps(s, _mm256_mul_ps(k, v)), b), e.act as u8);
            let a = _mm256_and_ps(t, _mm256_castsi256_ps(_mm256_srli_epi32::<1>(m)));
            *mx = _mm256_max_ps(a, *mx);
            t
        }
    };
    let p = out.y.as_mut_ptr().add(at);
    if full {
        _mm256_storeu_ps(p, v);
    } else {
        _mm256_maskstore_ps(p, m, v);
    }
}

/// Fold a running `max |y|` (channels `c..c + 8`, lanes `m`) into `out.cmax`.
#[inline(always)]
unsafe fn merge_max(out: &mut Out, c: usize, m: __m256i, mx: __m256) {
    if out.ep.is_some() {
        let p = out.cmax.as_mut_ptr().add(c);
        _mm256_maskstore_ps(p, m, _mm256_max_ps(mx, _mm256_maskload_ps(p, m)));
    }
}

/// Depthwise over one image quantized into its zero border (`x`, as the AVX-512 kernel
/// reads it, then [`dw_slack`]): `sum over taps of sign(w) * x` in 16-bit lanes, 16 channels
/// by [`SEG`] pixels per pass; weights `[tap][c padded to 16]` in `{-1, 0, 1}`.
#[target_feature(enable = "avx2,fma")]
pub unsafe fn dw_image(g: &ConvGeom, x: &[i16], w: &[i16], out: &mut Out) {
    let c = g.cin;
    let cpad = c.div_ceil(16) * 16;
    assert!(x.len() >= (g.h + 2 * g.pad) * (g.w + 2 * g.pad) * c + dw_slack(g));
    assert!(w.len() >= g.kh * g.kw * cpad && g.kh * g.kw <= 255);
    out.check(g.oh * g.ow * c, c);
    let len = match g.ow {
        0..=2 => 2,
        3..=4 => 4,
        _ => SEG,
    };
    for c0 in (0..c).step_by(16) {
        let lanes = (c - c0).min(16);
        let n = [lanes.min(8), lanes.saturating_sub(8)];
        let m = [lane_mask(n[0]), lane_mask(n[1])];
        let sb = [affine8(out, c0, m[0]), affine8(out, c0 + 8, m[1])];
        let mut mx = [_mm256_setzero_ps(); 2];
        for oy in 0..g.oh {
            for ox0 in (0..g.ow).step_by(len) {
                let np = len.min(g.ow - ox0);
                match len {
                    2 => run::<2>(g, x, w, cpad, out, oy, ox0, np, c0, &n, &m, &sb, &mut mx),
                    4 => run::<4>(g, x, w, cpad, out, oy, ox0, np, c0, &n, &m, &sb, &mut mx),
                    _ => run::<SEG>(g, x, w, cpad, out, oy, ox0, np, c0, &n, &m, &sb, &mut mx),
                }
            }
        }
        for h in 0..2 {
            if n[h] > 0 {
                merge_max(out, c0 + 8 * h, m[h], mx[h]);
            }
        }
    }
}

/// Output row `oy`, pixels `ox0..ox0 + np` (`S` computed), channels `c0..c0 + 16`.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn run<const S: usize>(
    g: &ConvGeom,
    x: &[i16],
    w: &[i16],
    cpad: usize,
    out: &mut Out,
    oy: usize,
    ox0: usize,
    np: usize,
    c0: usize,
    n: &[usize; 2],
    m: &[__m256i; 2],
    sb: &[[__m256; 3]; 2],
    mx: &mut [__m256; 2],
) {
    let c = g.cin;
    let (wp, step) = (g.w + 2 * g.pad, g.stride * c);
    let mut acc = [_mm256_setzero_si256(); S];
    for ky in 0..g.kh {
        let row = x.as_ptr().add(((oy * g.stride + ky) * wp + ox0 * g.stride) * c + c0);
        for kx in 0..g.kw {
            let wv = _mm256_loadu_si256(w.as_ptr().add((ky * g.kw + kx) * cpad + c0).cast());
            let mut q = row.add(kx * c);
            for a in acc.iter_mut() {
                *a = _mm256_add_epi16(*a, _mm256_sign_epi16(_mm256_loadu_si256(q.cast()), wv));
                q = q.wrapping_add(step);
            }
        }
    }
    // The running maxima in registers for the pass (through `mx` every emit would wait for
    // the previous one's store).
    let mut mr = *mx;
    for (i, &a) in acc.iter().enumerate().take(np) {
        let at = (oy * g.ow + ox0 + i) * c + c0;
        let halves =
            [_mm256_cvtepi16_epi32(_mm256_castsi256_si128(a)), _mm256_cvtepi16_epi32(_mm256_extracti128_si256::<1>(a))];
        for h in 0..2 {
            if n[h] > 0 {
                emit8(out, &mut mr[h], at + 8 * h, sb[h], m[h], n[h] == 8, halves[h]);
            }
        }
    }
    *mx = mr;
}

/// `out[c] = max |x[p][c]|` over the pixels of `out.len()` channels (NaN skipped).
#[target_feature(enable = "avx2,fma")]
pub unsafe fn channel_abs_max(x: &[f32], out: &mut [f32]) {
    let c = out.len();
    out.fill(0.0);
    let abs = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fff_ffff));
    let full = c / 8 * 8;
    // Eight channels at a time down the pixels, the running max in a register.
    for c0 in (0..full).step_by(8) {
        let mut m = _mm256_setzero_ps();
        for row in x.chunks_exact(c) {
            m = _mm256_max_ps(_mm256_and_ps(_mm256_loadu_ps(row.as_ptr().add(c0)), abs), m);
        }
        _mm256_storeu_ps(out.as_mut_ptr().add(c0), m);
    }
    for row in x.chunks_exact(c) {
        for (o, &v) in out[full..].iter_mut().zip(&row[full..]) {
            let a = v.abs();
            *o = if a > *o { a } else { *o };
        }
    }
}

/// 8 values quantized with the inverse scales `inv` (`round(v * inv)` to even, clamped to
/// `+-127`, NaN to `-127`), as 32-bit integers; lanes whose `inv` is 0 give 0.
#[inline(always)]
unsafe fn quantize8(v: __m256, inv: __m256) -> __m256i {
    let y = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(_mm256_mul_ps(v, inv));
    // max_ps(NaN, -127) = -127: NaN clamps to -127 as in `quantize_one`.
    let y = _mm256_min_ps(_mm256_max_ps(y, _mm256_set1_ps(-127.0)), _mm256_set1_ps(127.0));
    let q = _mm256_cvttps_epi32(y);
    _mm256_andnot_si256(_mm256_castps_si256(_mm256_cmp_ps::<_CMP_EQ_OQ>(inv, _mm256_setzero_ps())), q)
}

/// 16 quantized values from `x[..16]` with inverse scales `inv[..16]`, as 16-bit lanes in
/// order.
#[inline(always)]
unsafe fn quantize16(x: *const f32, inv: *const f32) -> __m256i {
    let a = quantize8(_mm256_loadu_ps(x), _mm256_loadu_ps(inv));
    let b = quantize8(_mm256_loadu_ps(x.add(8)), _mm256_loadu_ps(inv.add(8)));
    _mm256_permute4x64_epi64::<0b11_01_10_00>(_mm256_packs_epi32(a, b))
}

/// Quantize pixels of `inv.len()` channels with one inverse scale per channel (the rule of
/// [`super::quantize_channels`]).
#[target_feature(enable = "avx2,fma")]
pub unsafe fn quantize_channels(x: &[f32], q: &mut [i16], inv: &[f32]) {
    let c = inv.len();
    let full = c / 16 * 16;
    for (qr, xr) in q.chunks_exact_mut(c).zip(x.chunks_exact(c)) {
        for c0 in (0..full).step_by(16) {
            _mm256_storeu_si256(qr.as_mut_ptr().add(c0).cast(), quantize16(xr.as_ptr().add(c0), inv.as_ptr().add(c0)));
        }
        for ((qv, &v), &s) in qr[full..].iter_mut().zip(&xr[full..]).zip(&inv[full..]) {
            let y = super::quantize_one(v, s);
            *qv = if s == 0.0 { 0 } else { y };
        }
    }
}

/// Quantize with one inverse scale (the rule of [`super::quantize_into`]).
#[target_feature(enable = "avx2,fma")]
pub unsafe fn quantize_into(x: &[f32], q: &mut [i16], inv: f32) {
    let iv = [inv; 16];
    let n = x.len().min(q.len());
    let full = n / 16 * 16;
    for i in (0..full).step_by(16) {
        _mm256_storeu_si256(q.as_mut_ptr().add(i).cast(), quantize16(x.as_ptr().add(i), iv.as_ptr()));
    }
    for (qv, &v) in q[full..n].iter_mut().zip(&x[full..n]) {
        *qv = super::quantize_one(v, inv);
    }
}

/// Most pixels per pass of the pointwise kernel (four registers of 16-bit lanes per
/// output); images of fewer pixels take passes of 32 or 16.
pub const PX: usize = 64;
/// Fewest pixels per image for which plans use [`pw_rows`] (at 2x2 = 4 pixels, 12 of
/// every 16 lanes would be idle: mobilenet's 2x2 layers took 149 and 329 us this way
/// against 57 and 112 us vectorized over the output channels).
pub const MIN_PIXELS: usize = 16;
/// Inputs per 16-bit run (`256 * 127 < 2^15`), widened to 32 bits after each.
pub const RUN: usize = 256;

/// A pointwise layer's weights as lists, for [`pw_rows`]: per output channel and run of
/// [`RUN`] inputs, the indices of the transposed input rows whose
/// weight is `+1` (`plus`) and `-1` (`minus`). A layer without zero weights keeps only the
/// shorter list per channel (`flip`: the `-1` one) and forms `2 * sum(list) - sum(x)`
/// (negated when flipped); its inputs go in pairs, and a pair whose two weights are both in
/// the list is one entry, the pair's sum (rows `k + j`, added once per pass and shared by
/// every channel): 3 entries per 4 inputs instead of 4. A layer with zeros keeps both lists
/// and forms `sum(plus) - sum(minus)`, so pruned weights cost nothing.
#[derive(Clone, Debug)]
pub struct Lists {
    /// Inputs (`k`) the offsets were made for.
    pub(crate) k: usize,
    pub(crate) runs: usize,
    pub(crate) zeros: bool,
    /// `[cout * runs + 1]` starts into `plus`.
    pub(crate) plus_at: Vec<u32>,
    pub(crate) plus: Vec<u32>,
    /// `[cout * runs + 1]` starts into `minus` (all 0 without zeros).
    pub(crate) minus_at: Vec<u32>,
    pub(crate) minus: Vec<u32>,
    pub(crate) flip: Vec<bool>,
}

impl Lists {
    /// From `[cout][k]` weights in `{-1, 0, 1}`.
    pub fn new(k: usize, cout: usize, w: &[f32]) -> Lists {
        let zeros = w[..k * cout].contains(&0.0);
        let runs = k.div_ceil(RUN).max(1);
        let mut l = Lists {
            k,
            runs,
            zeros,
            plus_at: vec![0],
            plus: Vec::new(),
            minus_at: vec![0],
            minus: Vec::new(),
            flip: vec![false; cout],
        };
        for (co, row) in w.chunks_exact(k).take(cout).enumerate() {
            let negs = row.iter().filter(|&&v| v < 0.0).count();
            // Without zeros: sum over the shorter of the two lists.
            l.flip[co] = !zeros && 2 * negs < k;
            let listed = |v: f32| (v < 0.0) == l.flip[co];
            for r in 0..runs {
                let end = ((r + 1) * RUN).min(k);
                let mut i = r * RUN;
                while i < end {
                    if zeros {
                        if row[i] > 0.0 {
                            l.plus.push((i) as u32);
                        } else if row[i] < 0.0 {
                            l.minus.push((i) as u32);
                        }
                        i += 1;
                    } else if i + 1 < end {
                        // A pair (runs are even, so pairs never straddle two).
                        match (listed(row[i]), listed(row[i + 1])) {
                            (true, true) => l.plus.push((k + i / 2) as u32),
                            (true, false) => l.plus.push(i as u32),
                            (false, true) => l.plus.push((i + 1) as u32),
                            (false, false) => {}
                        }
                        i += 2;
                    } else {
                        if listed(row[i]) {
                            l.plus.push((i) as u32);
                        }
                        i += 1;
                    }
                }
                l.plus_at.push(l.plus.len() as u32);
                l.minus_at.push(l.minus.len() as u32);
            }
        }
        l
    }

    /// Transposed rows [`pw_rows`] reads: the `k` inputs, then (without zeros) the sums of
    /// the `k / 2` pairs.
    pub fn rows(&self) -> usize {
        if self.zeros {
            self.k
        } else {
            self.k + self.k / 2
        }
    }
}

/// `sum over list of x[row]` for `16 R` pixels into 16-bit lanes (rows `32 R` bytes apart).
#[inline(always)]
unsafe fn gather_sum<const R: usize>(base: *const u8, list: &[u32], acc: &mut [__m256i; R]) {
    for &row in list {
        let p = base.add(row as usize * 32 * R);
        for (j, a) in acc.iter_mut().enumerate() {
            *a = _mm256_add_epi16(*a, _mm256_loadu_si256(p.add(32 * j).cast()));
        }
    }
}

/// `acc32 += sign * widen(acc16)` (`16 R` lanes in pixel order, 8 per 32-bit register).
#[inline(always)]
unsafe fn widen<const R: usize, const R2: usize>(acc16: &[__m256i; R], acc32: &mut [__m256i; R2], sign: i32) {
    for (j, &a) in acc16.iter().enumerate() {
        let lo = _mm256_cvtepi16_epi32(_mm256_castsi256_si128(a));
        let hi = _mm256_cvtepi16_epi32(_mm256_extracti128_si256::<1>(a));
        if sign > 0 {
            acc32[2 * j] = _mm256_add_epi32(acc32[2 * j], lo);
            acc32[2 * j + 1] = _mm256_add_epi32(acc32[2 * j + 1], hi);
        } else {
            acc32[2 * j] = _mm256_sub_epi32(acc32[2 * j], lo);
            acc32[2 * j + 1] = _mm256_sub_epi32(acc32[2 * j + 1], hi);
        }
    }
}

/// Transpose pixels `r0..r0 + np` of `k` inputs into `planar` (`[k][W]`, pixels past `np`
/// zero), quantizing `f32` rows on the way (8 pixels by 8 channels per register transpose,
/// scalar edges; the quantization rule of [`quantize_into`]).
#[inline(always)]
unsafe fn to_planar<const W: usize>(x: super::Rows, k: usize, r0: usize, np: usize, planar: &mut [i16]) {
    if np < W {
        planar[..k * W].fill(0);
    }
    let (xf, inv) = match x {
        super::Rows::I16(x) => {
            for p in 0..np {
                for (i, &v) in x[(r0 + p) * k..][..k].iter().enumerate() {
                    planar[i * W + p] = v;
                }
            }
            return;
        }
        super::Rows::F32(x, inv) => (&x[r0 * k..][..np * k], inv),
    };
    let (kf, pf) = (k / 8 * 8, np / 8 * 8);
    let iv = _mm256_set1_ps(inv);
    let src = xf.as_ptr();
    for p0 in (0..pf).step_by(8) {
        for c0 in (0..kf).step_by(8) {
            let r: [__m256; 8] = std::array::from_fn(|i| {
                _mm256_castsi256_ps(quantize8(_mm256_loadu_ps(src.add((p0 + i) * k + c0)), iv))
            });
            for (j, &v) in transpose8(r).iter().enumerate() {
                let q = _mm256_packs_epi32(_mm256_castps_si256(v), _mm256_castps_si256(v));
                let q = _mm256_castsi256_si128(_mm256_permute4x64_epi64::<0b1000>(q));
                _mm_storeu_si128(planar.as_mut_ptr().add((c0 + j) * W + p0).cast(), q);
            }
        }
    }
    for p in 0..np {
        let from = if p < pf { kf } else { 0 };
        for (i, &v) in xf[p * k..][..k].iter().enumerate().skip(from) {
            planar[i * W + p] = super::quantize_one(v, inv);
        }
    }
}

/// An 8x8 transpose of 32-bit lanes: `out[j][i] = r[i][j]`.
#[inline(always)]
unsafe fn transpose8(r: [__m256; 8]) -> [__m256; 8] {
    let t0 = _mm256_unpacklo_ps(r[0], r[1]);
    let t1 = _mm256_unpackhi_ps(r[0], r[1]);
    let t2 = _mm256_unpacklo_ps(r[2], r[3]);
    let t3 = _mm256_unpackhi_ps(r[2], r[3]);
    let t4 = _mm256_unpacklo_ps(r[4], r[5]);
    let t5 = _mm256_unpackhi_ps(r[4], r[5]);
    let t6 = _mm256_unpacklo_ps(r[6], r[7]);
    let t7 = _mm256_unpackhi_ps(r[6], r[7]);
    let u0 = _mm256_shuffle_ps::<0x44>(t0, t2);
    let u1 = _mm256_shuffle_ps::<0xEE>(t0, t2);
    let u2 = _mm256_shuffle_ps::<0x44>(t1, t3);
    let u3 = _mm256_shuffle_ps::<0xEE>(t1, t3);
    let u4 = _mm256_shuffle_ps::<0x44>(t4, t6);
    let u5 = _mm256_shuffle_ps::<0xEE>(t4, t6);
    let u6 = _mm256_shuffle_ps::<0x44>(t5, t7);
    let u7 = _mm256_shuffle_ps::<0xEE>(t5, t7);
    [
        _mm256_permute2f128_ps::<0x20>(u0, u4),
        _mm256_permute2f128_ps::<0x20>(u1, u5),
        _mm256_permute2f128_ps::<0x20>(u2, u6),
        _mm256_permute2f128_ps::<0x20>(u3, u7),
        _mm256_permute2f128_ps::<0x31>(u0, u4),
        _mm256_permute2f128_ps::<0x31>(u1, u5),
        _mm256_permute2f128_ps::<0x31>(u2, u6),
        _mm256_permute2f128_ps::<0x31>(u3, u7),
    ]
}

/// Pointwise rows through the lists: `y[r][co] = sum_k sign(w[co][k]) * x[r][k]`, with the
/// epilogue of `out` (as [`emit8`]) and the per-channel `max |y|`. `planar`: `l.rows() *
/// PX` values; `tmp`: `cout` rounded up to 8, times `PX`. Passes of 64 pixels, or of 32 or
/// 16 for images with fewer (the 4x4 and 2x2 layers of mobilenet compute no idle lanes
/// past 16).
#[target_feature(enable = "avx2,fma")]
#[allow(clippy::too_many_arguments)]
pub unsafe fn pw_rows(
    x: super::Rows,
    k: usize,
    cout: usize,
    l: &Lists,
    out: &mut Out,
    planar: &mut [i16],
    tmp: &mut [f32],
) {
    let rows = x.len() / k;
    out.check(rows * cout, cout);
    let c8 = cout.div_ceil(8) * 8;
    assert!(planar.len() >= l.rows() * PX && tmp.len() >= c8 * PX);
    // Every row index is below `rows()` (made so in `Lists::new` for this `k`).
    assert!(l.k == k && l.plus_at.len() == cout * l.runs + 1 && l.minus_at.len() == cout * l.runs + 1);
    match rows {
        0..=16 => passes::<1, 2, 16>(x, k, cout, l, out, planar, tmp),
        17..=40 => passes::<2, 4, 32>(x, k, cout, l, out, planar, tmp),
        _ => passes::<4, 8, 64>(x, k, cout, l, out, planar, tmp),
    }
}

/// [`pw_rows`] in passes of `W = 16 R` pixels (`R2 = 2 R` registers of 32-bit sums).
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn passes<const R: usize, const R2: usize, const W: usize>(
    x: super::Rows,
    k: usize,
    cout: usize,
    l: &Lists,
    out: &mut Out,
    planar: &mut [i16],
    tmp: &mut [f32],
) {
    let rows = x.len() / k;
    let base = planar.as_ptr() as *const u8;
    let ep = out.ep;
    let mut r0 = 0;
    while r0 < rows {
        let np = (rows - r0).min(W);
        to_planar::<W>(x, k, r0, np, planar);
        if !l.zeros {
            // The pairs' sums (at most 2 * 127 per lane).
            let p = planar.as_mut_ptr();
            for j in 0..k / 2 {
                let (a, b, o) = (p.add(2 * j * W), p.add((2 * j + 1) * W), p.add((k + j) * W));
                for q in 0..R {
                    let v = _mm256_add_epi16(
                        _mm256_loadu_si256(a.add(16 * q).cast()),
                        _mm256_loadu_si256(b.add(16 * q).cast()),
                    );
                    _mm256_storeu_si256(o.add(16 * q).cast(), v);
                }
            }
        }
        // The sum of every input per pixel (dense layers: `y = 2 * sum(list) - sum(x)`).
        let mut s32 = [_mm256_setzero_si256(); R2];
        if !l.zeros {
            for r in 0..l.runs {
                let mut s16 = [_mm256_setzero_si256(); R];
                for i in r * RUN..((r + 1) * RUN).min(k) {
                    let p = base.add(i * W * 2);
                    for (j, a) in s16.iter_mut().enumerate() {
                        *a = _mm256_add_epi16(*a, _mm256_loadu_si256(p.add(32 * j).cast()));
                    }
                }
                widen(&s16, &mut s32, 1);
            }
        }
        // Lanes of the pass's real pixels (the max skips the others).
        let pm: [__m256i; R2] = std::array::from_fn(|j| lane_mask(np.saturating_sub(8 * j)));
        for co in 0..cout {
            let mut a32 = [_mm256_setzero_si256(); R2];
            for r in 0..l.runs {
                let at = co * l.runs + r;
                let mut a16 = [_mm256_setzero_si256(); R];
                gather_sum::<R>(base, &l.plus[l.plus_at[at] as usize..l.plus_at[at + 1] as usize], &mut a16);
                widen(&a16, &mut a32, 1);
                if l.zeros {
                    let mut n16 = [_mm256_setzero_si256(); R];
                    gather_sum::<R>(base, &l.minus[l.minus_at[at] as usize..l.minus_at[at + 1] as usize], &mut n16);
                    widen(&n16, &mut a32, -1);
                }
            }
            if !l.zeros {
                for (a, &s) in a32.iter_mut().zip(&s32) {
                    // 2 * list - sum, or sum - 2 * list for a flipped channel.
                    let two = _mm256_slli_epi32::<1>(*a);
                    *a = if l.flip[co] { _mm256_sub_epi32(s, two) } else { _mm256_sub_epi32(two, s) };
                }
            }
            let t = tmp.as_mut_ptr().add(co * W);
            match &ep {
                None => {
                    for (j, &a) in a32.iter().enumerate() {
                        _mm256_storeu_ps(t.add(8 * j), _mm256_cvtepi32_ps(a));
                    }
                }
                Some(e) => {
                    let (s, b) = (_mm256_set1_ps(e.scale[co]), _mm256_set1_ps(e.bias[co]));
                    let kk = _mm256_set1_ps(e.kc.map_or(e.k, |kc| kc[co]));
                    let mut mx = _mm256_setzero_ps();
                    for (j, &a) in a32.iter().enumerate() {
                        let v = _mm256_cvtepi32_ps(a);
                        let y = sbdnet_kernels::act256(
                            _mm256_add_ps(_mm256_mul_ps(s, _mm256_mul_ps(kk, v)), b),
                            e.act as u8,
                        );
                        _mm256_storeu_ps(t.add(8 * j), y);
                        mx = _mm256_max_ps(_mm256_and_ps(y, _mm256_castsi256_ps(_mm256_srli_epi32::<1>(pm[j]))), mx);
                    }
                    let mut l8 = [0f32; 8];
                    _mm256_storeu_ps(l8.as_mut_ptr(), mx);
                    let m = l8.iter().fold(out.cmax[co], |m, &v| if v > m { v } else { m });
                    out.cmax[co] = m;
                }
            }
        }
        from_planar::<W>(tmp, cout, np, &mut out.y[r0 * cout..][..np * cout]);
        r0 += np;
    }
}

/// `y[p][co] = tmp[co][p]` for `np` pixels: 8x8 transposes in registers, scalar edges.
#[inline(always)]
unsafe fn from_planar<const W: usize>(tmp: &[f32], cout: usize, np: usize, y: &mut [f32]) {
    let (cf, pf) = (cout / 8 * 8, np / 8 * 8);
    let t = tmp.as_ptr();
    for c0 in (0..cf).step_by(8) {
        for p0 in (0..pf).step_by(8) {
            let r: [__m256; 8] = std::array::from_fn(|i| _mm256_loadu_ps(t.add((c0 + i) * W + p0)));
            let o = transpose8(r);
            for (i, &v) in o.iter().enumerate() {
                _mm256_storeu_ps(y.as_mut_ptr().add((p0 + i) * cout + c0), v);
            }
        }
    }
    for p in 0..np {
        let yr = &mut y[p * cout..][..cout];
        let from = if p < pf { cf } else { 0 };
        for (co, v) in yr.iter_mut().enumerate().skip(from) {
            *v = tmp[co * W + p];
        }
    }
}

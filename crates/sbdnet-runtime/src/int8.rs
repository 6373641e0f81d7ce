//! The W1-A8 path: binary weights on 8-bit activations with additions and subtractions only
//! (the paper's multiplication-less form, `y = sum_{w=+1} x - sum_{w=-1} x`).
//!
//! - Activations are quantized per image (one scale for the tensor: `q = round(x * 127 /
//!   max|x|)`, `|q| <= 127`); that and the layer's per-channel affine afterwards are the only
//!   multiplications, one per activation element.
//! - Weights are stored as 16-bit AND-masks: `wp = 0xFFFF` where the weight is `+1`, `wn =
//!   0xFFFF` where it is `-1` (both `0` in a zero group of a sparse layer). A
//!   multiply-accumulate is then `acc += (x & wp) - (x & wn)`, or, for a layer without zeros,
//!   `acc += x & wp` and one `y = 2 * acc - sum(x)` at the end (`2 *` is a shift).
//! - Accumulators are 16-bit lanes (16 per AVX2 register), widened into 32-bit sums every 256
//!   input channels (`256 * 127 < 2^15`), so no partial sum overflows.
//!
//! The loops are written over fixed-size blocks so the compiler keeps the accumulators in
//! registers; [`sbdnet_kernels::simd_kernel`] compiles them for AVX2 when the CPU has it (and
//! `SBDNET_KERNEL=portable` forces the baseline build).

use sbdnet_kernels::conv::ConvGeom;

/// Output channels per register block of the pointwise kernel.
const CO_BLOCK: usize = 64;
/// Input channels per 16-bit accumulation run.
const CI_RUN: usize = 256;

/// Shape of the layer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum A8Kind {
    /// 1x1, stride 1, no padding.
    Pointwise,
    /// Depthwise, any k, stride, padding.
    Depthwise,
    /// Any other dense conv: 8-bit im2col, then the pointwise kernel.
    Dense,
}

/// A binary convolution on 8-bit activations, planned.
#[derive(Clone, Debug)]
pub struct A8Conv {
    g: ConvGeom,
    kind: A8Kind,
    /// Dense/pointwise: `[co_block][k_total][CO_BLOCK]` masks; depthwise: `[tap][c]`.
    wp: Vec<i16>,
    wn: Vec<i16>,
    /// Some weight is zero (a sparse layer): use `P - N` instead of `2P - S`.
    zeros: bool,
}

/// Reusable buffers of the W1-A8 kernels, sized at plan time.
#[derive(Clone, Debug, Default)]
pub struct QuantScratch {
    q: Vec<i16>,
    col: Vec<i16>,
    scale: Vec<f32>,
    acc: Vec<i16>,
}

impl QuantScratch {
    /// Grow to fit `c` (called once per layer at plan time).
    pub fn reserve(&mut self, c: &A8Conv) {
        let g = &c.g;
        grow(&mut self.q, g.in_len());
        grow(&mut self.scale, g.batch);
        grow(&mut self.acc, g.cin);
        if c.kind == A8Kind::Dense {
            grow(&mut self.col, g.out_rows() * g.kh * g.kw * g.cin);
        }
    }
}

fn grow<T: Default + Clone>(v: &mut Vec<T>, n: usize) {
    if v.len() < n {
        v.resize(n, T::default());
    }
}

fn mask(b: bool) -> i16 {
    if b {
        -1
    } else {
        0
    }
}

impl A8Conv {
    /// Plan from OHWI weights in `{-1, 0, +1}` (`[cout][k][k][cin / groups]`).
    pub fn new(g: ConvGeom, w: &[f32]) -> A8Conv {
        let zeros = w.contains(&0.0);
        let depthwise = g.groups > 1;
        let kind = if depthwise {
            A8Kind::Depthwise
        } else if g.kh == 1 && g.stride == 1 && g.pad == 0 {
            A8Kind::Pointwise
        } else {
            A8Kind::Dense
        };
        let (wp, wn) = if depthwise {
            let taps = g.kh * g.kw;
            let (mut wp, mut wn) = (vec![0i16; taps * g.cin], vec![0i16; taps * g.cin]);
            for c in 0..g.cin {
                for t in 0..taps {
                    wp[t * g.cin + c] = mask(w[c * taps + t] > 0.0);
                    wn[t * g.cin + c] = mask(w[c * taps + t] < 0.0);
                }
            }
            (wp, wn)
        } else {
            let kt = g.kh * g.kw * g.cin;
            let blocks = g.cout.div_ceil(CO_BLOCK);
            let (mut wp, mut wn) = (vec![0i16; blocks * kt * CO_BLOCK], vec![0i16; blocks * kt * CO_BLOCK]);
            for co in 0..g.cout {
                let (b, j) = (co / CO_BLOCK, co % CO_BLOCK);
                for k in 0..kt {
                    wp[(b * kt + k) * CO_BLOCK + j] = mask(w[co * kt + k] > 0.0);
                    wn[(b * kt + k) * CO_BLOCK + j] = mask(w[co * kt + k] < 0.0);
                }
            }
            (wp, wn)
        };
        A8Conv { g, kind, wp, wn, zeros }
    }

    /// Whether this is a depthwise layer.
    pub fn depthwise(&self) -> bool {
        self.kind == A8Kind::Depthwise
    }

    /// `y = conv(x)` for `n` images of `f32` input, through 8-bit activations: `y` (NHWC,
    /// `n * oh * ow * cout`) gets `scale_image * integer sum`.
    pub fn forward(&self, n: usize, x: &[f32], y: &mut [f32], s: &mut QuantScratch) {
        let g = ConvGeom { batch: n, ..self.g };
        let il = g.h * g.w * g.cin;
        let ol = g.oh * g.ow * g.cout;
        for b in 0..n {
            s.scale[b] = quantize(&x[b * il..][..il], &mut s.q[b * il..][..il]);
        }
        match self.kind {
            A8Kind::Depthwise => {
                for b in 0..n {
                    let acc = &mut s.acc[..g.cin];
                    dw_image(&g, &s.q[b * il..][..il], &self.wp, &self.wn, &mut y[b * ol..][..ol], acc);
                }
            }
            A8Kind::Pointwise => pw_rows(&s.q[..n * il], g.cin, g.cout, &self.wp, &self.wn, self.zeros, y),
            A8Kind::Dense => {
                let kt = g.kh * g.kw * g.cin;
                let rows = g.out_rows();
                im2col_i16(&g, &s.q[..n * il], &mut s.col[..rows * kt]);
                pw_rows(&s.col[..rows * kt], kt, g.cout, &self.wp, &self.wn, self.zeros, y);
            }
        }
        for (b, yb) in y[..n * ol].chunks_exact_mut(ol).enumerate() {
            scale_in_place(yb, s.scale[b]);
        }
    }
}

sbdnet_kernels::simd_kernel! {
    fn scale_in_place(y: &mut [f32], s: f32) {
        for v in y.iter_mut() {
            *v *= s;
        }
    }
}

sbdnet_kernels::simd_kernel! {
    /// `max |x|` into `out[0]` (eight running maxima, so it vectorizes).
    fn abs_max(x: &[f32], out: &mut [f32]) {
        let mut m = [0.0f32; 8];
        let mut chunks = x.chunks_exact(8);
        for c in &mut chunks {
            for j in 0..8 {
                let a = c[j].abs();
                // A compare-select (not f32::max) so it compiles to vmaxps; NaN is skipped.
                m[j] = if a > m[j] { a } else { m[j] };
            }
        }
        for &v in chunks.remainder() {
            m[0] = m[0].max(v.abs());
        }
        out[0] = m.iter().fold(0.0f32, |a, &b| a.max(b));
    }
}

/// Quantize to `|q| <= 127` with one scale; returns the scale (`x ~ q * scale`).
fn quantize(x: &[f32], q: &mut [i16]) -> f32 {
    let mut amax = [0.0f32];
    abs_max(x, &mut amax);
    let amax = amax[0];
    if !(amax > 0.0 && amax.is_finite()) {
        q.fill(0);
        return 1.0;
    }
    let inv = 127.0 / amax;
    quantize_into(x, q, inv);
    amax / 127.0
}

sbdnet_kernels::simd_kernel! {
    fn quantize_into(x: &[f32], q: &mut [i16], inv: f32) {
        for (q, &v) in q.iter_mut().zip(x) {
            let y = (v * inv).round_ties_even();
            // Clamp with compare-selects: NaN becomes -127, so the value is finite and in
            // range for the unchecked conversion (which, unlike `as`, vectorizes).
            let y = if y > -127.0 { y } else { -127.0 };
            let y = if y < 127.0 { y } else { 127.0 };
            // SAFETY: `y` is finite and within [-127, 127].
            *q = unsafe { y.to_int_unchecked::<i32>() } as i16;
        }
    }
}

/// Pointwise rows: `y[r][co] = sum_k sign(w[co][k]) * x[r][k]` (raw integer sums as `f32`).
fn pw_rows(x: &[i16], k: usize, cout: usize, wp: &[i16], wn: &[i16], zeros: bool, y: &mut [f32]) {
    let rows = x.len() / k;
    let blocks = cout.div_ceil(CO_BLOCK);
    let mut acc = [0i32; 2 * CO_BLOCK];
    let mut r = 0;
    while r < rows {
        let two = r + 1 < rows;
        let x0 = &x[r * k..][..k];
        let x1 = if two { &x[(r + 1) * k..][..k] } else { x0 };
        let (s0, s1) = if zeros { (0, 0) } else { (sum_i16(x0), sum_i16(x1)) };
        for b in 0..blocks {
            acc.fill(0);
            let bp = &wp[b * k * CO_BLOCK..][..k * CO_BLOCK];
            let bn = &wn[b * k * CO_BLOCK..][..k * CO_BLOCK];
            let mut k0 = 0;
            while k0 < k {
                let len = CI_RUN.min(k - k0);
                let (p, n) = (&bp[k0 * CO_BLOCK..][..len * CO_BLOCK], &bn[k0 * CO_BLOCK..][..len * CO_BLOCK]);
                if zeros {
                    pw_run_pn(&x0[k0..][..len], &x1[k0..][..len], p, n, &mut acc);
                } else {
                    pw_run_p(&x0[k0..][..len], &x1[k0..][..len], p, &mut acc);
                }
                k0 += len;
            }
            let co0 = b * CO_BLOCK;
            let m = CO_BLOCK.min(cout - co0);
            for (px, s) in [(0usize, s0), (1, s1)].into_iter().take(1 + two as usize) {
                let yr = &mut y[(r + px) * cout + co0..][..m];
                let a = &acc[px * CO_BLOCK..][..m];
                for (yv, &av) in yr.iter_mut().zip(a) {
                    // No zeros: sum_{+} x - sum_{-} x = 2 * sum_{+} x - sum x.
                    *yv = if zeros { av } else { (av << 1) - s } as f32;
                }
            }
        }
        r += 2;
    }
}

fn sum_i16(x: &[i16]) -> i32 {
    x.iter().map(|&v| v as i32).sum()
}

sbdnet_kernels::simd_kernel! {
    /// One run of at most 256 input channels for two pixels: 16-bit `acc += x & wp`, then
    /// widened into `acc32`.
    fn pw_run_p(x0: &[i16], x1: &[i16], wp: &[i16], acc32: &mut [i32; 2 * CO_BLOCK]) {
        let mut a0 = [0i16; CO_BLOCK];
        let mut a1 = [0i16; CO_BLOCK];
        for ((&v0, &v1), w) in x0.iter().zip(x1).zip(wp.chunks_exact(CO_BLOCK)) {
            let w: &[i16; CO_BLOCK] = w.try_into().expect("block");
            for j in 0..CO_BLOCK {
                a0[j] = a0[j].wrapping_add(v0 & w[j]);
                a1[j] = a1[j].wrapping_add(v1 & w[j]);
            }
        }
        for j in 0..CO_BLOCK {
            acc32[j] += a0[j] as i32;
            acc32[CO_BLOCK + j] += a1[j] as i32;
        }
    }
}

sbdnet_kernels::simd_kernel! {
    /// As [`pw_run_p`] with zeros: `acc += (x & wp) - (x & wn)`.
    fn pw_run_pn(x0: &[i16], x1: &[i16], wp: &[i16], wn: &[i16], acc32: &mut [i32; 2 * CO_BLOCK]) {
        let mut a0 = [0i16; CO_BLOCK];
        let mut a1 = [0i16; CO_BLOCK];
        for (((&v0, &v1), p), n) in x0.iter().zip(x1).zip(wp.chunks_exact(CO_BLOCK)).zip(wn.chunks_exact(CO_BLOCK)) {
            let p: &[i16; CO_BLOCK] = p.try_into().expect("block");
            let n: &[i16; CO_BLOCK] = n.try_into().expect("block");
            for j in 0..CO_BLOCK {
                a0[j] = a0[j].wrapping_add(v0 & p[j]).wrapping_sub(v0 & n[j]);
                a1[j] = a1[j].wrapping_add(v1 & p[j]).wrapping_sub(v1 & n[j]);
            }
        }
        for j in 0..CO_BLOCK {
            acc32[j] += a0[j] as i32;
            acc32[CO_BLOCK + j] += a1[j] as i32;
        }
    }
}

sbdnet_kernels::simd_kernel! {
/// Depthwise over one image: `y[oy][ox][c] = sum_{valid taps} (x & wp) - (x & wn)`.
fn dw_image(g: &ConvGeom, x: &[i16], wp: &[i16], wn: &[i16], y: &mut [f32], acc: &mut [i16]) {
    let c = g.cin;
    for oy in 0..g.oh {
        for ox in 0..g.ow {
            acc.fill(0);
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
                    let t = ky * g.kw + kx;
                    let xr = &x[(iy as usize * g.w + ix as usize) * c..][..c];
                    for (((a, &v), &p), &n) in acc.iter_mut().zip(xr).zip(&wp[t * c..][..c]).zip(&wn[t * c..][..c]) {
                        *a = a.wrapping_add(v & p).wrapping_sub(v & n);
                    }
                }
            }
            let yr = &mut y[(oy * g.ow + ox) * c..][..c];
            for (yv, &a) in yr.iter_mut().zip(acc.iter()) {
                *yv = a as f32;
            }
        }
    }
}
}

/// im2col of 16-bit activations (zero padding gives `0`, as training's float zero).
fn im2col_i16(g: &ConvGeom, x: &[i16], col: &mut [i16]) {
    let kt = g.kh * g.kw * g.cin;
    for b in 0..g.batch {
        for oy in 0..g.oh {
            for ox in 0..g.ow {
                let row = &mut col[((b * g.oh + oy) * g.ow + ox) * kt..][..kt];
                for ky in 0..g.kh {
                    for kx in 0..g.kw {
                        let dst = &mut row[(ky * g.kw + kx) * g.cin..][..g.cin];
                        let iy = (oy * g.stride + ky) as isize - g.pad as isize;
                        let ix = (ox * g.stride + kx) as isize - g.pad as isize;
                        if iy < 0 || ix < 0 || iy >= g.h as isize || ix >= g.w as isize {
                            dst.fill(0);
                        } else {
                            dst.copy_from_slice(&x[((b * g.h + iy as usize) * g.w + ix as usize) * g.cin..][..g.cin]);
                        }
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Exact integer reference: the sum of `sign(w) * q` with zero padding.
    fn reference(g: &ConvGeom, q: &[i16], w: &[f32]) -> Vec<i32> {
        let cpg = g.cin / g.groups;
        let mut y = vec![0i32; g.out_len()];
        for b in 0..g.batch {
            for oy in 0..g.oh {
                for ox in 0..g.ow {
                    for co in 0..g.cout {
                        let gi = co / (g.cout / g.groups);
                        let mut s = 0i32;
                        for ky in 0..g.kh {
                            for kx in 0..g.kw {
                                let iy = (oy * g.stride + ky) as isize - g.pad as isize;
                                let ix = (ox * g.stride + kx) as isize - g.pad as isize;
                                if iy < 0 || ix < 0 || iy >= g.h as isize || ix >= g.w as isize {
                                    continue;
                                }
                                for ci in 0..cpg {
                                    let xv = q[((b * g.h + iy as usize) * g.w + ix as usize) * g.cin + gi * cpg + ci];
                                    let wv = w[((co * g.kh + ky) * g.kw + kx) * cpg + ci];
                                    if wv > 0.0 {
                                        s += xv as i32;
                                    } else if wv < 0.0 {
                                        s -= xv as i32;
                                    }
                                }
                            }
                        }
                        y[((b * g.oh + oy) * g.ow + ox) * g.cout + co] = s;
                    }
                }
            }
        }
        y
    }

    fn check(g: ConvGeom, zero_every: usize, seed: u64) {
        let mut rng = sbdnet_kernels::rng::Rng::new(seed);
        let x: Vec<f32> = (0..g.in_len()).map(|_| rng.normal()).collect();
        let w: Vec<f32> = (0..g.weight_len())
            .map(|i| {
                if zero_every > 0 && i % zero_every == 0 {
                    0.0
                } else if rng.uniform() < 0.5 {
                    -1.0
                } else {
                    1.0
                }
            })
            .collect();
        let conv = A8Conv::new(g, &w);
        let mut s = QuantScratch::default();
        s.reserve(&conv);
        let mut y = vec![0.0f32; g.out_len()];
        conv.forward(g.batch, &x, &mut y, &mut s);
        // Recompute the quantized input and the exact integer sums.
        let il = g.h * g.w * g.cin;
        let mut q = vec![0i16; g.in_len()];
        let mut scales = Vec::new();
        for b in 0..g.batch {
            scales.push(quantize(&x[b * il..][..il], &mut q[b * il..][..il]));
        }
        let want = reference(&g, &q, &w);
        let ol = g.oh * g.ow * g.cout;
        for (i, (&got, &exact)) in y.iter().zip(&want).enumerate() {
            let expect = exact as f32 * scales[i / ol];
            assert_eq!(got, expect, "{g:?} zero_every {zero_every} at {i}");
        }
    }

    #[test]
    fn a8_kernels_match_the_integer_reference() {
        for (i, &(b, h, cin, cout, k, stride, pad, groups)) in [
            (1, 5, 7, 9, 1, 1, 0, 1),
            (3, 4, 300, 70, 1, 1, 0, 1),
            (2, 6, 16, 16, 3, 1, 1, 16),
            (2, 7, 70, 70, 3, 2, 1, 70),
            (1, 6, 5, 130, 3, 1, 1, 1),
            (2, 5, 3, 8, 3, 2, 0, 1),
        ]
        .iter()
        .enumerate()
        {
            let g = ConvGeom::new(b, h, h, cin, cout, k, stride, pad, groups).unwrap();
            check(g, 0, i as u64);
            check(g, 5, 100 + i as u64);
        }
    }
}

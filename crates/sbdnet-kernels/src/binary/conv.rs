//! Optimized dense binary convolution: XOR + popcount over the contiguous word runs that an
//! input row and a weight row share, four output channels at a time, threaded over output
//! rows.
//!
//! For output pixel `(oy, ox)` the valid taps form a rectangle `ky0..ky1 x kx0..kx1`; for
//! one `ky` the input words of taps `kx0..kx1` are contiguous in NHWC (`(kx1 - kx0) *
//! words(Cin)` words from pixel `(iy, ix0)`), and so are the weight words of those taps in
//! OHWI. Each output is `Cin * n_valid - 2 * sum of the popcounts` (module contract in
//! [`super`]).

use super::{words, BinaryImpl};
use crate::conv::ConvGeom;
use rayon::prelude::*;

/// Popcount of `x XOR w` summed over a run of words, for one or four weight runs.
pub(super) trait PopXor {
    /// `sum_j popcount(x[j] ^ w[i][j])` for the four runs `w[i]` (each `x.len()` words).
    fn run4(x: &[u64], w: [&[u64]; 4]) -> [u32; 4];
    /// `sum_j popcount(x[j] ^ w[j])`.
    fn run1(x: &[u64], w: &[u64]) -> u32;
}

/// `u64::count_ones`: the `POPCNT` instruction when compiled with it, else a bit trick.
pub(super) struct Scalar;

impl PopXor for Scalar {
    #[inline(always)]
    fn run4(x: &[u64], w: [&[u64]; 4]) -> [u32; 4] {
        let n = x.len();
        let (w0, w1, w2, w3) = (&w[0][..n], &w[1][..n], &w[2][..n], &w[3][..n]);
        let mut a = [0u32; 4];
        for j in 0..n {
            let v = x[j];
            a[0] += (v ^ w0[j]).count_ones();
            a[1] += (v ^ w1[j]).count_ones();
            a[2] += (v ^ w2[j]).count_ones();
            a[3] += (v ^ w3[j]).count_ones();
        }
        a
    }

    #[inline(always)]
    fn run1(x: &[u64], w: &[u64]) -> u32 {
        x.iter().zip(w).map(|(&a, &b)| (a ^ b).count_ones()).sum()
    }
}

/// Valid kernel taps `k0..k1` of output coordinate `o` along an axis of `size` pixels.
#[inline(always)]
pub(super) fn valid_taps(o: usize, stride: usize, pad: usize, k: usize, size: usize) -> (usize, usize) {
    let start = o * stride;
    let k0 = pad.saturating_sub(start);
    let k1 = (size + pad).saturating_sub(start).min(k);
    (k0, k1.max(k0))
}

/// One output row `row = b * oh + oy` (`out`: `ow * cout` values).
#[inline(always)]
fn row_body<P: PopXor>(g: &ConvGeom, x: &[u64], w: &[u64], out: &mut [i32], row: usize) {
    let wd = words(g.cin);
    let (b, oy) = (row / g.oh, row % g.oh);
    let (ky0, ky1) = valid_taps(oy, g.stride, g.pad, g.kh, g.h);
    let wrow = g.kh * g.kw * wd;
    for ox in 0..g.ow {
        let (kx0, kx1) = valid_taps(ox, g.stride, g.pad, g.kw, g.w);
        let len = (kx1 - kx0) * wd;
        let bits = (g.cin * (ky1 - ky0) * (kx1 - kx0)) as i32;
        let o = &mut out[ox * g.cout..][..g.cout];
        if len == 0 || ky0 == ky1 {
            o.fill(0);
            continue;
        }
        let ix0 = ox * g.stride + kx0 - g.pad;
        o.fill(bits);
        for ky in ky0..ky1 {
            let iy = oy * g.stride + ky - g.pad;
            let xr = &x[((b * g.h + iy) * g.w + ix0) * wd..][..len];
            let wo = (ky * g.kw + kx0) * wd;
            let mut wrows = w[..g.cout * wrow].chunks_exact(wrow);
            let mut blocks = o.chunks_exact_mut(4);
            for ob in &mut blocks {
                let mut next = || &wrows.next().unwrap()[wo..wo + len];
                let a = P::run4(xr, [next(), next(), next(), next()]);
                for i in 0..4 {
                    ob[i] -= 2 * a[i] as i32;
                }
            }
            for (ob, wr) in blocks.into_remainder().iter_mut().zip(wrows) {
                *ob -= 2 * P::run1(xr, &wr[wo..wo + len]) as i32;
            }
        }
    }
}

fn rows(imp: BinaryImpl, g: &ConvGeom, x: &[u64], w: &[u64], out: &mut [i32], row: usize) {
    match imp {
        #[cfg(target_arch = "x86_64")]
        BinaryImpl::Popcnt | BinaryImpl::Avx512 => {
            #[target_feature(enable = "popcnt")]
            unsafe fn popcnt(g: &ConvGeom, x: &[u64], w: &[u64], out: &mut [i32], row: usize) {
                row_body::<Scalar>(g, x, w, out, row)
            }
            // SAFETY: `BinaryImpl::Popcnt` is only run when the CPU reports popcnt (checked by
            // the public entry points through `BinaryImpl::available`).
            unsafe { popcnt(g, x, w, out, row) }
        }
        #[cfg(target_arch = "x86_64")]
        BinaryImpl::Avx2Shuffle => {
            #[target_feature(enable = "avx2,popcnt")]
            unsafe fn avx2(g: &ConvGeom, x: &[u64], w: &[u64], out: &mut [i32], row: usize) {
                row_body::<super::x86_64::Shuffle>(g, x, w, out, row)
            }
            // SAFETY: as above, with avx2 and popcnt.
            unsafe { avx2(g, x, w, out, row) }
        }
        _ => row_body::<Scalar>(g, x, w, out, row),
    }
}

/// Threaded over output rows (batch 1 included); `imp` is not `Reference`.
pub(super) fn bconv_forward(imp: BinaryImpl, g: &ConvGeom, x: &[u64], w: &[u64], out: &mut [i32]) {
    let row_len = g.ow * g.cout;
    if row_len == 0 {
        return;
    }
    out[..g.out_len()].par_chunks_mut(row_len).enumerate().for_each(|(row, o)| rows(imp, g, x, w, o, row));
}

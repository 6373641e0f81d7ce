//! Reference binary kernels: unpack every bit to `+1` / `-1` and run the plain loops of the
//! float convolution in integer arithmetic. Padded taps (outside the image) are skipped: they
//! contribute `0`, as the float zero padding of training does.
//!
//! ```text
//! bconv:  out[b,oy,ox,co] = sum_{ky,kx valid} sum_ci  w(co,ky,kx,ci) * x(b,iy,ix,ci)
//! bdw:    out[b,oy,ox,c]  = sum_{ky,kx valid}         w(c,ky,kx)     * x(b,iy,ix,c)
//! ```
//!
//! with `iy = oy*stride - pad + ky`, `ix = ox*stride - pad + kx`, and every value `+-1`.

use super::{words, SignThreshold, WORD_BITS};
use crate::conv::ConvGeom;
use crate::reference::in_coord;

/// The `+-1` value of channel `ch` of packed pixel `pix` (rows of `wd` words).
#[inline]
pub fn value(p: &[u64], wd: usize, pix: usize, ch: usize) -> i32 {
    1 - 2 * ((p[pix * wd + ch / WORD_BITS] >> (ch % WORD_BITS)) & 1) as i32
}

/// Dense binary convolution (groups = 1) in `+-1` arithmetic; see [`super::bconv_forward`].
pub fn bconv_forward(g: &ConvGeom, x: &[u64], w: &[u64], out: &mut [i32]) {
    let wd = words(g.cin);
    for b in 0..g.batch {
        for oy in 0..g.oh {
            for ox in 0..g.ow {
                for co in 0..g.cout {
                    let mut s = 0i32;
                    for ky in 0..g.kh {
                        let Some(iy) = in_coord(oy, ky, g.stride, g.pad, g.h) else {
                            continue;
                        };
                        for kx in 0..g.kw {
                            let Some(ix) = in_coord(ox, kx, g.stride, g.pad, g.w) else {
                                continue;
                            };
                            let (xp, wp) = ((b * g.h + iy) * g.w + ix, (co * g.kh + ky) * g.kw + kx);
                            for ci in 0..g.cin {
                                s += value(w, wd, wp, ci) * value(x, wd, xp, ci);
                            }
                        }
                    }
                    out[((b * g.oh + oy) * g.ow + ox) * g.cout + co] = s;
                }
            }
        }
    }
}

/// Depthwise binary convolution in `+-1` arithmetic; `w` tap-major `[kh*kw][words(c)]`.
pub fn bdw_forward(g: &ConvGeom, x: &[u64], w: &[u64], out: &mut [i32]) {
    let wd = words(g.cin);
    for b in 0..g.batch {
        for oy in 0..g.oh {
            for ox in 0..g.ow {
                for ch in 0..g.cin {
                    let mut s = 0i32;
                    for ky in 0..g.kh {
                        let Some(iy) = in_coord(oy, ky, g.stride, g.pad, g.h) else {
                            continue;
                        };
                        for kx in 0..g.kw {
                            let Some(ix) = in_coord(ox, kx, g.stride, g.pad, g.w) else {
                                continue;
                            };
                            let xp = (b * g.h + iy) * g.w + ix;
                            s += value(w, wd, ky * g.kw + kx, ch) * value(x, wd, xp, ch);
                        }
                    }
                    out[((b * g.oh + oy) * g.ow + ox) * g.cin + ch] = s;
                }
            }
        }
    }
}

/// [`bdw_forward`] followed by the per-channel threshold, packed (padding bits `0`).
pub fn bdw_forward_packed(g: &ConvGeom, x: &[u64], w: &[u64], thr: &[SignThreshold], out: &mut [u64]) {
    let mut s = vec![0i32; g.out_len()];
    bdw_forward(g, x, w, &mut s);
    super::threshold_pack(&s, g.cout, thr, out);
}

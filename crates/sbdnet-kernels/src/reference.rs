//! Reference kernels: the plainest loops that state the math. They are the oracle every
//! optimized kernel is tested against, and the path `SBDNET_KERNEL=reference` runs.
//!
//! Layouts: activations NHWC `[b][y][x][c]`; convolution weights OHWI
//! `[cout][ky][kx][cin / groups]`; zero padding.

use crate::conv::ConvGeom;

/// `C (+)= op(A) op(B)`, row-major; `ta`: A stored `[k][m]`; `tb`: B stored `[n][k]`.
#[allow(clippy::too_many_arguments)]
pub fn matmul(m: usize, n: usize, k: usize, a: &[f32], ta: bool, b: &[f32], tb: bool, c: &mut [f32], accumulate: bool) {
    for i in 0..m {
        for j in 0..n {
            let mut s = 0.0f32;
            for p in 0..k {
                let av = if ta { a[p * m + i] } else { a[i * k + p] };
                let bv = if tb { b[j * k + p] } else { b[p * n + j] };
                s += av * bv;
            }
            c[i * n + j] = if accumulate { c[i * n + j] + s } else { s };
        }
    }
}

/// Input coordinate of output coordinate `o` at kernel tap `t`, if inside the image.
#[inline]
pub fn in_coord(o: usize, t: usize, stride: usize, pad: usize, size: usize) -> Option<usize> {
    let i = (o * stride + t) as isize - pad as isize;
    (i >= 0 && (i as usize) < size).then_some(i as usize)
}

/// Convolution forward: `out[b,oy,ox,co] = sum_{ky,kx,ci} w[co,ky,kx,ci] * x[b,iy,ix,g*cig+ci]`
/// with `iy = oy*stride - pad + ky`, `g = co / (cout/groups)`, `cig = cin/groups`; taps that
/// fall outside the image read zero.
pub fn conv2d_forward(g: &ConvGeom, x: &[f32], w: &[f32], out: &mut [f32]) {
    let (cig, cog) = (g.cin / g.groups, g.cout / g.groups);
    for b in 0..g.batch {
        for oy in 0..g.oh {
            for ox in 0..g.ow {
                for co in 0..g.cout {
                    let grp = co / cog;
                    let mut s = 0.0f32;
                    for ky in 0..g.kh {
                        let Some(iy) = in_coord(oy, ky, g.stride, g.pad, g.h) else {
                            continue;
                        };
                        for kx in 0..g.kw {
                            let Some(ix) = in_coord(ox, kx, g.stride, g.pad, g.w) else {
                                continue;
                            };
                            for ci in 0..cig {
                                s += w[((co * g.kh + ky) * g.kw + kx) * cig + ci]
                                    * x[((b * g.h + iy) * g.w + ix) * g.cin + grp * cig + ci];
                            }
                        }
                    }
                    out[((b * g.oh + oy) * g.ow + ox) * g.cout + co] = s;
                }
            }
        }
    }
}

/// Convolution backward: adds `dL/dx` into `dx` and `dL/dw` into `dw` given `dy = dL/dout`.
pub fn conv2d_backward(g: &ConvGeom, x: &[f32], w: &[f32], dy: &[f32], dx: &mut [f32], dw: &mut [f32]) {
    let (cig, cog) = (g.cin / g.groups, g.cout / g.groups);
    for b in 0..g.batch {
        for oy in 0..g.oh {
            for ox in 0..g.ow {
                for co in 0..g.cout {
                    let grp = co / cog;
                    let d = dy[((b * g.oh + oy) * g.ow + ox) * g.cout + co];
                    for ky in 0..g.kh {
                        let Some(iy) = in_coord(oy, ky, g.stride, g.pad, g.h) else {
                            continue;
                        };
                        for kx in 0..g.kw {
                            let Some(ix) = in_coord(ox, kx, g.stride, g.pad, g.w) else {
                                continue;
                            };
                            for ci in 0..cig {
                                let wi = ((co * g.kh + ky) * g.kw + kx) * cig + ci;
                                let xi = ((b * g.h + iy) * g.w + ix) * g.cin + grp * cig + ci;
                                dx[xi] += w[wi] * d;
                                dw[wi] += x[xi] * d;
                            }
                        }
                    }
                }
            }
        }
    }
}

/// Batch normalization statistics over the rows of `x[rows][c]`: per-channel mean and biased
/// variance, accumulated in f64.
pub fn channel_mean_var(x: &[f32], c: usize) -> (Vec<f32>, Vec<f32>) {
    let rows = x.len() / c;
    let mut mean = vec![0.0f64; c];
    for r in 0..rows {
        for ch in 0..c {
            mean[ch] += x[r * c + ch] as f64;
        }
    }
    mean.iter_mut().for_each(|m| *m /= rows as f64);
    let mut var = vec![0.0f64; c];
    for r in 0..rows {
        for ch in 0..c {
            let d = x[r * c + ch] as f64 - mean[ch];
            var[ch] += d * d;
        }
    }
    (mean.iter().map(|&m| m as f32).collect(), var.iter().map(|&v| (v / rows as f64) as f32).collect())
}

/// Max pooling forward (`k x k`, stride, no padding) over NHWC.
#[allow(clippy::too_many_arguments)]
pub fn max_pool(x: &[f32], batch: usize, h: usize, w: usize, c: usize, k: usize, stride: usize, out: &mut [f32]) {
    let (oh, ow) = ((h - k) / stride + 1, (w - k) / stride + 1);
    for b in 0..batch {
        for oy in 0..oh {
            for ox in 0..ow {
                for ch in 0..c {
                    let mut m = f32::NEG_INFINITY;
                    for ky in 0..k {
                        for kx in 0..k {
                            m = m.max(x[((b * h + oy * stride + ky) * w + ox * stride + kx) * c + ch]);
                        }
                    }
                    out[((b * oh + oy) * ow + ox) * c + ch] = m;
                }
            }
        }
    }
}

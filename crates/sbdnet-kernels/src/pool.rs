//! Pooling over NHWC: max and average (`k x k`, stride, no padding) and global average.
//!
//! Output size `(H - k) / stride + 1`. Max pooling records the flat input index of each
//! maximum (first maximum on ties) so its backward routes the gradient there.

use rayon::prelude::*;

/// Pooling geometry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PoolGeom {
    /// Images.
    pub batch: usize,
    /// Input height.
    pub h: usize,
    /// Input width.
    pub w: usize,
    /// Channels.
    pub c: usize,
    /// Window size.
    pub k: usize,
    /// Stride.
    pub stride: usize,
}

impl PoolGeom {
    /// Output height.
    pub fn oh(&self) -> usize {
        (self.h - self.k) / self.stride + 1
    }
    /// Output width.
    pub fn ow(&self) -> usize {
        (self.w - self.k) / self.stride + 1
    }
    /// Output floats.
    pub fn out_len(&self) -> usize {
        self.batch * self.oh() * self.ow() * self.c
    }
}

/// Max pooling forward; `arg[i]` receives the index within the image of output `i`'s maximum.
pub fn max_pool_forward(g: &PoolGeom, x: &[f32], y: &mut [f32], arg: &mut [u32]) {
    let (oh, ow, c) = (g.oh(), g.ow(), g.c);
    let (il, ol) = (g.h * g.w * c, oh * ow * c);
    y[..g.batch * ol].par_chunks_mut(ol).zip(arg[..g.batch * ol].par_chunks_mut(ol)).enumerate().for_each(
        |(b, (yb, ab))| {
            let xb = &x[b * il..][..il];
            for oy in 0..oh {
                for ox in 0..ow {
                    for ch in 0..c {
                        let mut best = f32::NEG_INFINITY;
                        let mut bi = 0usize;
                        for ky in 0..g.k {
                            for kx in 0..g.k {
                                let i = ((oy * g.stride + ky) * g.w + ox * g.stride + kx) * c + ch;
                                if xb[i] > best || (ky == 0 && kx == 0) {
                                    best = xb[i];
                                    bi = i;
                                }
                            }
                        }
                        let o = (oy * ow + ox) * c + ch;
                        yb[o] = best;
                        ab[o] = bi as u32;
                    }
                }
            }
        },
    );
}

/// Max pooling backward: `dx[arg] += dy` (`dx` zeroed first unless `add`).
pub fn max_pool_backward(g: &PoolGeom, arg: &[u32], dy: &[f32], dx: &mut [f32], add: bool) {
    let ol = g.oh() * g.ow() * g.c;
    let il = g.h * g.w * g.c;
    dx[..g.batch * il].par_chunks_mut(il).enumerate().for_each(|(b, dxb)| {
        if !add {
            dxb.fill(0.0);
        }
        for o in 0..ol {
            dxb[arg[b * ol + o] as usize] += dy[b * ol + o];
        }
    });
}

/// Average pooling forward.
pub fn avg_pool_forward(g: &PoolGeom, x: &[f32], y: &mut [f32]) {
    let (oh, ow, c) = (g.oh(), g.ow(), g.c);
    let (il, ol) = (g.h * g.w * c, oh * ow * c);
    let inv = 1.0 / (g.k * g.k) as f32;
    y[..g.batch * ol].par_chunks_mut(ol).enumerate().for_each(|(b, yb)| {
        let xb = &x[b * il..][..il];
        for oy in 0..oh {
            for ox in 0..ow {
                let o = &mut yb[(oy * ow + ox) * c..][..c];
                o.fill(0.0);
                for ky in 0..g.k {
                    for kx in 0..g.k {
                        let i = ((oy * g.stride + ky) * g.w + ox * g.stride + kx) * c;
                        crate::elementwise::add_assign_inline(o, &xb[i..i + c]);
                    }
                }
                o.iter_mut().for_each(|v| *v *= inv);
            }
        }
    });
}

/// Average pooling backward: every input of a window gets `dy / k^2` (`dx` zeroed first
/// unless `add`).
pub fn avg_pool_backward(g: &PoolGeom, dy: &[f32], dx: &mut [f32], add: bool) {
    let (oh, ow, c) = (g.oh(), g.ow(), g.c);
    let (il, ol) = (g.h * g.w * c, oh * ow * c);
    let inv = 1.0 / (g.k * g.k) as f32;
    dx[..g.batch * il].par_chunks_mut(il).enumerate().for_each(|(b, dxb)| {
        let dyb = &dy[b * ol..][..ol];
        if !add {
            dxb.fill(0.0);
        }
        for oy in 0..oh {
            for ox in 0..ow {
                let d = &dyb[(oy * ow + ox) * c..][..c];
                for ky in 0..g.k {
                    for kx in 0..g.k {
                        let i = ((oy * g.stride + ky) * g.w + ox * g.stride + kx) * c;
                        for (t, &dv) in dxb[i..i + c].iter_mut().zip(d) {
                            *t += dv * inv;
                        }
                    }
                }
            }
        }
    });
}

/// Global average pooling forward: `y[b][ch] = mean over pixels of x[b][.][.][ch]`.
pub fn global_avg_forward(x: &[f32], y: &mut [f32], batch: usize, pixels: usize, c: usize) {
    let inv = 1.0 / pixels as f32;
    y[..batch * c].par_chunks_mut(c).enumerate().for_each(|(b, yb)| {
        yb.fill(0.0);
        for p in 0..pixels {
            crate::elementwise::add_assign_inline(yb, &x[(b * pixels + p) * c..][..c]);
        }
        yb.iter_mut().for_each(|v| *v *= inv);
    });
}

/// Global average pooling backward (adds when `add`, else writes).
pub fn global_avg_backward(dy: &[f32], dx: &mut [f32], batch: usize, pixels: usize, c: usize, add: bool) {
    let inv = 1.0 / pixels as f32;
    dx[..batch * pixels * c].par_chunks_mut(pixels * c).enumerate().for_each(|(b, dxb)| {
        let d = &dy[b * c..][..c];
        for px in dxb.chunks_exact_mut(c) {
            for (t, &dv) in px.iter_mut().zip(d) {
                *t = if add { *t + dv * inv } else { dv * inv };
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn max_pool_matches_reference_and_routes_grad() {
        let g = PoolGeom { batch: 2, h: 4, w: 4, c: 3, k: 2, stride: 2 };
        let mut r = crate::rng::Rng::new(9);
        let x: Vec<f32> = (0..g.batch * 48).map(|_| r.normal()).collect();
        let mut want = vec![0.0; g.out_len()];
        crate::reference::max_pool(&x, 2, 4, 4, 3, 2, 2, &mut want);
        let mut y = vec![0.0; g.out_len()];
        let mut arg = vec![0; g.out_len()];
        max_pool_forward(&g, &x, &mut y, &mut arg);
        assert_eq!(y, want);
        let mut dx = vec![0.0; x.len()];
        max_pool_backward(&g, &arg, &vec![1.0; g.out_len()], &mut dx, true);
        assert_eq!(dx.iter().sum::<f32>(), g.out_len() as f32);
        for (i, &d) in dx.iter().enumerate() {
            if d > 0.0 {
                assert!(y.contains(&x[i]));
            }
        }
    }

    #[test]
    fn avg_and_global() {
        let g = PoolGeom { batch: 1, h: 2, w: 2, c: 1, k: 2, stride: 2 };
        let x = [1.0, 2.0, 3.0, 4.0];
        let mut y = [0.0];
        avg_pool_forward(&g, &x, &mut y);
        assert_eq!(y, [2.5]);
        let mut dx = [0.0; 4];
        avg_pool_backward(&g, &[4.0], &mut dx, false);
        assert_eq!(dx, [1.0; 4]);
        global_avg_forward(&x, &mut y, 1, 4, 1);
        assert_eq!(y, [2.5]);
        let mut dx = [0.0; 4];
        global_avg_backward(&[8.0], &mut dx, 1, 4, 1, true);
        assert_eq!(dx, [2.0; 4]);
    }
}

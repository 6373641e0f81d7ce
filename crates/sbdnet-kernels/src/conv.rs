//! Convolution kernels over NHWC activations and OHWI weights.
//!
//! [`conv2d_forward`] / [`conv2d_backward`] pick the algorithm from the geometry:
//! - **pointwise** (1x1, stride 1, no padding, one group): the activation tensor *is* a
//!   `[B*H*W, Cin]` matrix, so forward is one GEMM `Y = X W^T`, the input gradient
//!   `dX += dY W`, and the weight gradient `dW += dY^T X` a long-`k` GEMM split across threads;
//! - **depthwise** (groups = Cin = Cout): direct loops whose innermost loop runs over the
//!   contiguous channels (vectorized; AVX2 when available), threaded over images;
//! - **dense** (groups = 1): im2col into a planned `[B*OH*OW, KH*KW*Cin]` buffer, then GEMM;
//! - anything else (grouped, not depthwise): the reference loops.
//!
//! Padding is zero padding of `pad` pixels on every side; output size
//! `(H + 2*pad - KH) / stride + 1`.

use crate::dispatch::{kernel_path, with_simd, KernelPath};
use crate::matmul::{sgemm, sgemm_tn_split_k, split_k_scratch_len, Trans};
use crate::reference::{self, in_coord};
use crate::GradMode;
use rayon::prelude::*;

/// Geometry of one convolution over a batch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConvGeom {
    /// Images in the batch.
    pub batch: usize,
    /// Input height.
    pub h: usize,
    /// Input width.
    pub w: usize,
    /// Input channels.
    pub cin: usize,
    /// Output channels.
    pub cout: usize,
    /// Kernel height.
    pub kh: usize,
    /// Kernel width.
    pub kw: usize,
    /// Stride (both directions).
    pub stride: usize,
    /// Zero padding (every side).
    pub pad: usize,
    /// Groups (`cin` and `cout` divisible by it).
    pub groups: usize,
    /// Output height.
    pub oh: usize,
    /// Output width.
    pub ow: usize,
}

/// The algorithm [`conv2d_forward`] uses for a geometry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConvAlgo {
    /// 1x1, stride 1, no padding, one group: plain GEMM.
    Pointwise,
    /// One input channel per group, `cout == cin`.
    Depthwise,
    /// One group: im2col + GEMM.
    Im2col,
    /// Grouped convolution: reference loops.
    Direct,
}

impl ConvGeom {
    /// Geometry from its parameters; `None` if the kernel does not fit or the channel counts
    /// do not divide by `groups`.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        batch: usize,
        h: usize,
        w: usize,
        cin: usize,
        cout: usize,
        k: usize,
        stride: usize,
        pad: usize,
        groups: usize,
    ) -> Option<Self> {
        if k == 0 || stride == 0 || groups == 0 || !cin.is_multiple_of(groups) || !cout.is_multiple_of(groups) {
            return None;
        }
        if h + 2 * pad < k || w + 2 * pad < k {
            return None;
        }
        let oh = (h + 2 * pad - k) / stride + 1;
        let ow = (w + 2 * pad - k) / stride + 1;
        Some(ConvGeom { batch, h, w, cin, cout, kh: k, kw: k, stride, pad, groups, oh, ow })
    }

    /// Weight count (`cout * kh * kw * cin / groups`).
    pub fn weight_len(&self) -> usize {
        self.cout * self.kh * self.kw * (self.cin / self.groups)
    }
    /// Input floats.
    pub fn in_len(&self) -> usize {
        self.batch * self.h * self.w * self.cin
    }
    /// Output floats.
    pub fn out_len(&self) -> usize {
        self.batch * self.oh * self.ow * self.cout
    }
    /// Output pixels over the batch (rows of the output matrix).
    pub fn out_rows(&self) -> usize {
        self.batch * self.oh * self.ow
    }
    /// Which algorithm the optimized path uses.
    pub fn algo(&self) -> ConvAlgo {
        if self.kh == 1 && self.kw == 1 && self.stride == 1 && self.pad == 0 && self.groups == 1 {
            ConvAlgo::Pointwise
        } else if self.groups == self.cin && self.cin == self.cout {
            ConvAlgo::Depthwise
        } else if self.groups == 1 {
            ConvAlgo::Im2col
        } else {
            ConvAlgo::Direct
        }
    }
    /// Floats of the im2col buffer (0 unless [`ConvAlgo::Im2col`]).
    pub fn col_len(&self) -> usize {
        match self.algo() {
            ConvAlgo::Im2col => self.out_rows() * self.kh * self.kw * self.cin,
            _ => 0,
        }
    }
    /// Scratch floats [`conv2d_backward`] needs with `threads` workers.
    pub fn scratch_len(&self, threads: usize) -> usize {
        let k = self.kh * self.kw * self.cin;
        match self.algo() {
            ConvAlgo::Pointwise => split_k_scratch_len(self.cout, self.cin, self.out_rows(), threads),
            ConvAlgo::Depthwise => (threads + 1) * self.kh * self.kw * self.cin,
            ConvAlgo::Im2col => split_k_scratch_len(self.cout, k, self.out_rows(), threads) + self.col_len(),
            ConvAlgo::Direct => 0,
        }
    }
}

/// Transpose depthwise weights `[c][kh][kw]` into tap-major `[kh*kw][c]`.
fn taps_major(g: &ConvGeom, w: &[f32], wt: &mut [f32]) {
    let taps = g.kh * g.kw;
    for ch in 0..g.cin {
        for t in 0..taps {
            wt[t * g.cin + ch] = w[ch * taps + t];
        }
    }
}

/// `o += a * b` element-wise (multiply, then add: the same rounding as the AVX2 version).
#[inline(always)]
fn axpy_mul(o: &mut [f32], a: &[f32], b: &[f32]) {
    for ((o, &a), &b) in o.iter_mut().zip(a).zip(b) {
        *o += a * b;
    }
}

/// Depthwise forward of one image, on the AVX2 path when it is active.
fn dw_forward_image(g: &ConvGeom, x: &[f32], wt: &[f32], out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if kernel_path() == KernelPath::Avx2 {
        #[target_feature(enable = "avx2")]
        unsafe fn avx2(g: &ConvGeom, x: &[f32], wt: &[f32], out: &mut [f32]) {
            dw_forward_image_with(g, x, wt, out, |o, a, b| unsafe { crate::x86_64::mul_add_into(o, a, b) })
        }
        // SAFETY: the AVX2 path is only chosen when the CPU has AVX2.
        return unsafe { avx2(g, x, wt, out) };
    }
    dw_forward_image_with(g, x, wt, out, axpy_mul)
}

/// Depthwise backward of one image, on the AVX2 path when it is active.
fn dw_backward_image(g: &ConvGeom, x: &[f32], wt: &[f32], dy: &[f32], dx: &mut [f32], dwt: &mut [f32], add: bool) {
    #[cfg(target_arch = "x86_64")]
    if kernel_path() == KernelPath::Avx2 {
        #[target_feature(enable = "avx2")]
        #[allow(clippy::too_many_arguments)]
        unsafe fn avx2(g: &ConvGeom, x: &[f32], wt: &[f32], dy: &[f32], dx: &mut [f32], dwt: &mut [f32], add: bool) {
            dw_backward_image_with(g, x, wt, dy, dx, dwt, add, |o, a, b| unsafe {
                crate::x86_64::mul_add_into(o, a, b)
            })
        }
        // SAFETY: the AVX2 path is only chosen when the CPU has AVX2.
        return unsafe { avx2(g, x, wt, dy, dx, dwt, add) };
    }
    dw_backward_image_with(g, x, wt, dy, dx, dwt, add, axpy_mul)
}

/// Depthwise forward of one image; `wt` is tap-major.
#[inline(always)]
fn dw_forward_image_with(
    g: &ConvGeom,
    x: &[f32],
    wt: &[f32],
    out: &mut [f32],
    axpy_mul: impl Fn(&mut [f32], &[f32], &[f32]),
) {
    let c = g.cin;
    for oy in 0..g.oh {
        for ox in 0..g.ow {
            let o = &mut out[(oy * g.ow + ox) * c..][..c];
            o.fill(0.0);
            for ky in 0..g.kh {
                let Some(iy) = in_coord(oy, ky, g.stride, g.pad, g.h) else {
                    continue;
                };
                for kx in 0..g.kw {
                    let Some(ix) = in_coord(ox, kx, g.stride, g.pad, g.w) else {
                        continue;
                    };
                    axpy_mul(o, &wt[(ky * g.kw + kx) * c..][..c], &x[(iy * g.w + ix) * c..][..c]);
                }
            }
        }
    }
}

/// Depthwise backward of one image: `dx += W^T dy` and `dwt += dy * x` (tap-major); `dx` is
/// zeroed first unless `add`.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn dw_backward_image_with(
    g: &ConvGeom,
    x: &[f32],
    wt: &[f32],
    dy: &[f32],
    dx: &mut [f32],
    dwt: &mut [f32],
    add: bool,
    axpy_mul: impl Fn(&mut [f32], &[f32], &[f32]),
) {
    let c = g.cin;
    if !add {
        dx.fill(0.0);
    }
    for oy in 0..g.oh {
        for ox in 0..g.ow {
            let d = &dy[(oy * g.ow + ox) * c..][..c];
            for ky in 0..g.kh {
                let Some(iy) = in_coord(oy, ky, g.stride, g.pad, g.h) else {
                    continue;
                };
                for kx in 0..g.kw {
                    let Some(ix) = in_coord(ox, kx, g.stride, g.pad, g.w) else {
                        continue;
                    };
                    let t = (ky * g.kw + kx) * c;
                    let xi = (iy * g.w + ix) * c;
                    axpy_mul(&mut dx[xi..xi + c], &wt[t..t + c], d);
                    axpy_mul(&mut dwt[t..t + c], &x[xi..xi + c], d);
                }
            }
        }
    }
}

/// im2col: `col[(b,oy,ox)][(ky,kx,ci)] = x[b, iy, ix, ci]` (zero outside the image).
pub fn im2col(g: &ConvGeom, x: &[f32], col: &mut [f32]) {
    let row = g.kh * g.kw * g.cin;
    let per_image = g.oh * g.ow * row;
    col[..g.batch * per_image].par_chunks_mut(per_image).enumerate().for_each(|(b, colb)| {
        let xb = &x[b * g.h * g.w * g.cin..][..g.h * g.w * g.cin];
        for oy in 0..g.oh {
            for ox in 0..g.ow {
                let r = &mut colb[(oy * g.ow + ox) * row..][..row];
                for ky in 0..g.kh {
                    for kx in 0..g.kw {
                        let dst = &mut r[(ky * g.kw + kx) * g.cin..][..g.cin];
                        match (in_coord(oy, ky, g.stride, g.pad, g.h), in_coord(ox, kx, g.stride, g.pad, g.w)) {
                            (Some(iy), Some(ix)) => dst.copy_from_slice(&xb[(iy * g.w + ix) * g.cin..][..g.cin]),
                            _ => dst.fill(0.0),
                        }
                    }
                }
            }
        }
    });
}

/// col2im: the adjoint of [`im2col`]; adds every column entry back into `dx` (zeroed first
/// unless `add`).
pub fn col2im(g: &ConvGeom, col: &[f32], dx: &mut [f32], add: bool) {
    let row = g.kh * g.kw * g.cin;
    let per_image = g.oh * g.ow * row;
    let img = g.h * g.w * g.cin;
    dx[..g.batch * img].par_chunks_mut(img).enumerate().for_each(|(b, dxb)| {
        let colb = &col[b * per_image..][..per_image];
        if !add {
            dxb.fill(0.0);
        }
        with_simd(|| {
            for oy in 0..g.oh {
                for ox in 0..g.ow {
                    let r = &colb[(oy * g.ow + ox) * row..][..row];
                    for ky in 0..g.kh {
                        let Some(iy) = in_coord(oy, ky, g.stride, g.pad, g.h) else {
                            continue;
                        };
                        for kx in 0..g.kw {
                            let Some(ix) = in_coord(ox, kx, g.stride, g.pad, g.w) else {
                                continue;
                            };
                            crate::elementwise::add_assign_inline(
                                &mut dxb[(iy * g.w + ix) * g.cin..][..g.cin],
                                &r[(ky * g.kw + kx) * g.cin..][..g.cin],
                            );
                        }
                    }
                }
            }
        })
    });
}

/// Convolution forward `out = conv(x, w)`. `col` must hold [`ConvGeom::col_len`] floats; it
/// keeps the im2col matrix for the backward pass. `scratch`: [`ConvGeom::scratch_len`].
pub fn conv2d_forward(g: &ConvGeom, x: &[f32], w: &[f32], out: &mut [f32], col: &mut [f32], scratch: &mut [f32]) {
    assert!(x.len() >= g.in_len() && w.len() >= g.weight_len() && out.len() >= g.out_len());
    if kernel_path() == KernelPath::Reference {
        return reference::conv2d_forward(g, x, w, out);
    }
    let threads = crate::threads();
    match g.algo() {
        ConvAlgo::Pointwise => sgemm(g.out_rows(), g.cout, g.cin, x, Trans::No, w, Trans::Yes, out, false, threads),
        ConvAlgo::Depthwise => {
            let wt = &mut scratch[..g.kh * g.kw * g.cin];
            taps_major(g, w, wt);
            let wt = &*wt;
            let (inl, outl) = (g.h * g.w * g.cin, g.oh * g.ow * g.cout);
            out[..g.out_len()]
                .par_chunks_mut(outl)
                .enumerate()
                .for_each(|(b, ob)| dw_forward_image(g, &x[b * inl..][..inl], wt, ob));
        }
        ConvAlgo::Im2col => {
            im2col(g, x, col);
            let k = g.kh * g.kw * g.cin;
            sgemm(g.out_rows(), g.cout, k, col, Trans::No, w, Trans::Yes, out, false, threads)
        }
        ConvAlgo::Direct => reference::conv2d_forward(g, x, w, out),
    }
}

/// Convolution backward: writes or adds (`mode`) `dL/dx` into `dx` and adds `dL/dw` into
/// `dw`. `col` is the buffer the forward pass filled; `scratch`: [`ConvGeom::scratch_len`]
/// floats. With [`GradMode::Skip`] the GEMM paths skip the input gradient; the others write
/// it anyway.
#[allow(clippy::too_many_arguments)]
pub fn conv2d_backward(
    g: &ConvGeom,
    x: &[f32],
    w: &[f32],
    dy: &[f32],
    dx: &mut [f32],
    dw: &mut [f32],
    col: &[f32],
    scratch: &mut [f32],
    mode: GradMode,
) {
    assert!(dy.len() >= g.out_len() && dx.len() >= g.in_len() && dw.len() >= g.weight_len());
    if kernel_path() == KernelPath::Reference {
        if !mode.adds() {
            dx[..g.in_len()].fill(0.0);
        }
        return reference::conv2d_backward(g, x, w, dy, dx, dw);
    }
    let threads = crate::threads();
    let rows = g.out_rows();
    match g.algo() {
        ConvAlgo::Pointwise => {
            if mode != GradMode::Skip {
                sgemm(rows, g.cin, g.cout, dy, Trans::No, w, Trans::No, dx, mode.adds(), threads);
            }
            sgemm_tn_split_k(g.cout, g.cin, rows, dy, x, dw, true, threads, scratch);
        }
        ConvAlgo::Depthwise => depthwise_backward(g, x, w, dy, dx, dw, scratch, threads, mode.adds()),
        ConvAlgo::Im2col => {
            let k = g.kh * g.kw * g.cin;
            let (sk, dcol) = scratch.split_at_mut(split_k_scratch_len(g.cout, k, rows, threads));
            sgemm_tn_split_k(g.cout, k, rows, dy, col, dw, true, threads, sk);
            if mode != GradMode::Skip {
                sgemm(rows, k, g.cout, dy, Trans::No, w, Trans::No, dcol, false, threads);
                col2im(g, dcol, dx, mode.adds());
            }
        }
        ConvAlgo::Direct => {
            if !mode.adds() {
                dx[..g.in_len()].fill(0.0);
            }
            reference::conv2d_backward(g, x, w, dy, dx, dw)
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn depthwise_backward(
    g: &ConvGeom,
    x: &[f32],
    w: &[f32],
    dy: &[f32],
    dx: &mut [f32],
    dw: &mut [f32],
    scratch: &mut [f32],
    threads: usize,
    add: bool,
) {
    let taps = g.kh * g.kw;
    let tc = taps * g.cin;
    let (wt, partials) = scratch.split_at_mut(tc);
    taps_major(g, w, wt);
    let wt = &*wt;
    // Each part owns `per` consecutive images: its slice of dx and its own dw partial.
    let per = g.batch.div_ceil(threads.max(1)).max(1);
    let parts = g.batch.div_ceil(per);
    let (inl, outl) = (g.h * g.w * g.cin, g.oh * g.ow * g.cout);
    let partials = &mut partials[..parts * tc];
    partials.par_chunks_mut(tc).zip(dx[..g.in_len()].par_chunks_mut(per * inl)).enumerate().for_each(
        |(p, (dwt, dxs))| {
            dwt.fill(0.0);
            for (i, b) in (p * per..((p + 1) * per).min(g.batch)).enumerate() {
                let (xb, dyb) = (&x[b * inl..][..inl], &dy[b * outl..][..outl]);
                dw_backward_image(g, xb, wt, dyb, &mut dxs[i * inl..][..inl], dwt, add);
            }
        },
    );
    // Reduce the partials in order, then add into dw ([c][kh][kw]).
    for ch in 0..g.cin {
        for t in 0..taps {
            let mut s = 0.0f32;
            for p in 0..parts {
                s += partials[p * tc + t * g.cin + ch];
            }
            dw[ch * taps + t] += s;
        }
    }
}

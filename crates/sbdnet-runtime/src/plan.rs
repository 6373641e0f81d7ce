//! Plan once, run many times: [`Plan::new`] chooses a kernel per layer, unpacks nothing it
//! does not need, prepares thresholds and sizes every buffer for a batch; [`Plan::run`] then
//! allocates nothing.
//!
//! Kernels per layer:
//!
//! | layer | input | kernel |
//! |-------|-------|--------|
//! | binary dense conv | bits | XOR + popcount ([`sbdnet_kernels::binary::bconv_forward`]), then integer thresholds to bits or an affine to `f32` |
//! | binary depthwise 3x3 | bits | bit-sliced counting on 64 channels at once, thresholds fused ([`sbdnet_kernels::binary::bdw_forward_packed`]) |
//! | binary conv | `f32` | [`A8`](crate::int8): activations quantized to 8 bits, add/subtract only (W1-A8); or `f32` emulation with `Precision::Float` |
//! | float conv | `f32` | GEMM / direct depthwise ([`sbdnet_kernels::conv::conv2d_forward`]) |
//! | linear, pools, affine, add | `f32` | plain loops |

use crate::error::{graph_err, RuntimeError};
use crate::format::DeployedModel;
use crate::graph::{f32s, i32s, u64s, Act, Kind, Op, Output, ValueInfo, Weights};
use crate::int8::{A8Conv, QuantScratch};
use rayon::prelude::*;
use sbdnet_kernels::binary::pointwise::PackedPointwise;
use sbdnet_kernels::binary::sparse::SparsePointwise;
use sbdnet_kernels::binary::{self, DwThresholds, SignThreshold};
use sbdnet_kernels::conv::{conv2d_forward, ConvGeom};
use std::time::Instant;

/// How binary layers on `f32` inputs (the W1 path) run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum A8Mode {
    /// Quantize activations to 8 bits per tensor and add/subtract (multiplication-free).
    #[default]
    Int8,
    /// Unpack weights to `+-1.0` and run the float convolution (exact as training, slower).
    Float,
}

/// Options of [`Plan::new`].
#[derive(Clone, Copy, Debug, Default)]
pub struct PlanOptions {
    /// The W1 path.
    pub a8: A8Mode,
}

/// Output stage of a convolution.
#[derive(Clone, Debug)]
enum Stage {
    Affine { scale: Vec<f32>, bias: Vec<f32>, act: Act },
    Threshold(Vec<SignThreshold>),
    Sign { scale: Vec<f32>, bias: Vec<f32>, act: Act, t: Vec<f32> },
}

/// Channels of a sparse depthwise layer whose whole kernel is zero: their dot product is 0,
/// so their output is a constant (`thr.bit(0)` for bits, `0` for integers).
#[derive(Clone, Debug)]
struct ZeroChannels {
    /// Per output word: bits of the zero channels.
    zero: Vec<u64>,
    /// Per output word: the constant output bits of those channels.
    value: Vec<u64>,
    /// Zero channel indices.
    list: Vec<usize>,
}

#[derive(Clone, Debug)]
enum Kernel {
    /// A dense float convolution with few inputs per output (the first layer): direct loops
    /// over `[tap][ci][co]` weights, vectorized over output channels.
    SmallConv {
        g: ConvGeom,
        wt: Vec<f32>,
        stage: Stage,
        /// Sign output fused into the convolution on AVX-512 ([`crate::conv_sign`]).
        fused: Option<crate::conv_sign::Folded>,
        /// An affine stage run in the fused kernel's registers (AVX-512 or AVX2) ([`crate::conv_sign::conv_affine`]).
        affine512: bool,
    },
    /// Float weights (or unpacked binary ones) on `f32`.
    FloatConv {
        g: ConvGeom,
        w: Vec<f32>,
        stage: Stage,
    },
    /// Binary pointwise conv on bits (word-major weights, VPOPCNTQ where available).
    BinPw {
        p: PackedPointwise,
        stage: Stage,
        /// Affine stage and the global average pooling after it fused into the kernel: the
        /// step writes the pooled `n * cout` values at the start of its output buffer.
        gap: bool,
    },
    /// Sparse binary pointwise conv on bits: zero groups skipped.
    SparsePw {
        p: SparsePointwise,
        stage: Stage,
        /// As for `BinPw`.
        gap: bool,
    },
    /// Sparse binary k x k conv on bits (neither pointwise nor depthwise): unpacked input,
    /// float convolution with `+-1` / `0` weights.
    SparseConvBits {
        g: ConvGeom,
        w: Vec<f32>,
        stage: Stage,
    },
    /// Dense binary conv on bits.
    BinConv {
        g: ConvGeom,
        w: Vec<u64>,
        stage: Stage,
    },
    /// Binary depthwise 3x3 on bits; packed thresholds when the stage is `Threshold`.
    BinDw {
        g: ConvGeom,
        w: Vec<u64>,
        stage: Stage,
        packed: Option<DwThresholds>,
        zero: Option<ZeroChannels>,
    },
    /// Binary weights on 8-bit activations.
    A8 {
        conv: A8Conv,
        stage: Stage,
    },
    Linear {
        inp: usize,
        out: usize,
        /// `[inp][out]`.
        wt: Vec<f32>,
        b: Option<Vec<f32>>,
    },
    Binarize {
        t: Vec<f32>,
    },
    Affine {
        scale: Vec<f32>,
        bias: Vec<f32>,
        act: Act,
    },
    Activation(Act),
    Pool {
        k: usize,
        stride: usize,
        max: bool,
    },
    Gap,
    /// Pooling already done by the pointwise step before it: copy its `n * c` results.
    GapFused,
    Copy,
    Add,
}

impl Kernel {
    fn name(&self) -> &'static str {
        match self {
            Kernel::SmallConv { fused: Some(_), .. } => "conv-f32-direct-sign",
            Kernel::SmallConv { affine512: true, .. } => "conv-f32-direct-affine",
            Kernel::SmallConv { .. } => "conv-f32-direct",
            Kernel::FloatConv { .. } => "conv-f32",
            Kernel::BinPw { gap: true, .. } => "bpw-xnor+affine+gap",
            Kernel::BinPw { .. } => "bpw-xnor",
            Kernel::GapFused => "gap-fused-above",
            Kernel::SparsePw { gap: true, .. } => "bpw-sparse-xnor+affine+gap",
            Kernel::SparsePw { .. } => "bpw-sparse-xnor",
            Kernel::SparseConvBits { .. } => "bconv-sparse-unpacked",
            Kernel::BinConv { .. } => "bconv-xnor",
            Kernel::BinDw { packed: Some(_), .. } => "bdw-bitsliced",
            Kernel::BinDw { .. } => "bdw-xnor",
            Kernel::A8 { conv, .. } if conv.depthwise() => "dw-w1a8-addsub",
            Kernel::A8 { conv, .. } if conv.lookup() => "conv-w1a8-lookup",
            Kernel::A8 { .. } => "conv-w1a8-addsub",
            Kernel::Linear { .. } => "linear-f32",
            Kernel::Binarize { .. } => "binarize",
            Kernel::Affine { .. } => "affine",
            Kernel::Activation(_) => "activation",
            Kernel::Pool { max: true, .. } => "maxpool",
            Kernel::Pool { .. } => "avgpool",
            Kernel::Gap => "gap",
            Kernel::Copy => "flatten",
            Kernel::Add => "add",
        }
    }
}

#[derive(Clone, Debug)]
struct Step {
    inputs: Vec<usize>,
    kernel: Kernel,
}

/// Per-layer description of a plan, with accumulated time when profiling.
#[derive(Clone, Debug, serde::Serialize)]
pub struct StepInfo {
    /// Layer name.
    pub name: String,
    /// Kernel chosen.
    pub kernel: &'static str,
    /// Output shape `[h, w, c]`.
    pub out: [usize; 3],
    /// Output is packed bits.
    pub bits_out: bool,
    /// Binary multiply-accumulates per image done as XOR + popcount.
    pub binary_macs: u64,
    /// Multiply-accumulates per image done as 8-bit additions/subtractions.
    pub addsub_macs: u64,
    /// Float multiply-accumulates per image.
    pub float_macs: u64,
    /// W1-A8 lookup layers: table lookups per image (`addsub_macs` of these layers are done
    /// by lookups and `lookup_adds` additions instead of one addition each).
    pub lookups: u64,
    /// W1-A8 lookup layers: 16-bit additions per image (tables and accumulation).
    pub lookup_adds: u64,
    /// Accumulated nanoseconds in this layer (profiling).
    pub ns: u64,
    /// Fastest single run of this layer, nanoseconds (profiling; robust on a busy machine).
    pub min_ns: u64,
}

/// A planned model for a fixed maximum batch.
#[derive(Debug)]
pub struct Plan {
    steps: Vec<Step>,
    values: Vec<ValueInfo>,
    batch: usize,
    f32_bufs: Vec<Vec<f32>>,
    bit_bufs: Vec<Vec<u64>>,
    raw_i32: Vec<i32>,
    raw_f32: Vec<f32>,
    col: Vec<f32>,
    scratch: Vec<f32>,
    /// Bits input unpacked to `+-1.0` (sparse k x k layers on bits).
    unpacked: Vec<f32>,
    quant: QuantScratch,
    /// Per-step info and time.
    pub info: Vec<StepInfo>,
    /// Accumulate per-step time in `info`.
    pub profile: bool,
    runs: u64,
}

fn stage_of(m: &DeployedModel, name: &str, out: &Output, n: usize) -> Result<Stage, RuntimeError> {
    let t = &m.tensors;
    Ok(match out {
        Output::Affine { scale, bias, act } => Stage::Affine {
            scale: f32s(t, name, scale, n)?.to_vec(),
            bias: f32s(t, name, bias, n)?.to_vec(),
            act: *act,
        },
        Output::Threshold { thr, flip } => {
            let th = i32s(t, name, thr, n)?;
            let fl = crate::graph::u8s(t, name, flip, n)?;
            Stage::Threshold(th.iter().zip(fl).map(|(&thr, &f)| SignThreshold { thr, negative: f == 1 }).collect())
        }
        Output::Sign { scale, bias, act, t: th } => Stage::Sign {
            scale: f32s(t, name, scale, n)?.to_vec(),
            bias: f32s(t, name, bias, n)?.to_vec(),
            act: *act,
            t: f32s(t, name, th, n)?.to_vec(),
        },
    })
}

/// Apply a stage to `f32` raw sums: write `f32` or packed bits.
fn stage_f32(stage: &Stage, raw: &[f32], c: usize, out_f: &mut [f32], out_b: &mut [u64]) {
    match stage {
        Stage::Affine { scale, bias, act } => affine_rows(raw, c, scale, bias, *act, out_f),
        Stage::Sign { scale, bias, act, t } => {
            let wd = binary::words(c);
            for (or, xr) in out_b.chunks_exact_mut(wd).zip(raw.chunks_exact(c)) {
                for (wi, o) in or.iter_mut().enumerate() {
                    let r = wi * 64..(wi * 64 + 64).min(c);
                    *o = sign_word(&xr[r.clone()], &scale[r.clone()], &bias[r.clone()], &t[r], *act as u8);
                }
            }
        }
        Stage::Threshold(_) => unreachable!("integer thresholds follow binary layers on bits only"),
    }
}

sbdnet_kernels::simd_kernel! {
    /// One word of sign bits (`1` = `-1`): bit `i` = `!(act(scale[i] * x[i] + bias[i]) > t[i])`
    /// for up to 64 channels; `act`: 0 none, 1 relu, 2 hardtanh (as [`Act`]).
    /// The per-channel rule is [`crate::conv_sign::SignStage::positive`], the one the fused
    /// kernel's folded thresholds are bisected from.
    fn sign_word_into(x: &[f32], scale: &[f32], bias: &[f32], t: &[f32], act: u8, out: &mut [u64]) {
        let st = crate::conv_sign::SignStage { scale, bias, t, act };
        let mut neg = [false; 64];
        for (i, n) in neg.iter_mut().enumerate().take(x.len().min(64)) {
            *n = !st.positive(i, x[i]);
        }
        let mut word = 0u64;
        for (i, &n) in neg.iter().enumerate().take(x.len()) {
            word |= (n as u64) << i;
        }
        out[0] = word;
    }
}

fn sign_word(x: &[f32], scale: &[f32], bias: &[f32], t: &[f32], act: u8) -> u64 {
    #[cfg(target_arch = "x86_64")]
    if x.len().is_multiple_of(8) && sbdnet_kernels::kernel_path() == sbdnet_kernels::KernelPath::Avx2 {
        // SAFETY: the AVX2 path is chosen only when the CPU has AVX2; all slices hold x.len().
        return unsafe { sign_word64_avx2(x, scale, bias, t, act) };
    }
    let mut w = [0u64];
    sign_word_into(x, scale, bias, t, act, &mut w);
    w[0]
}

/// [`sign_word_into`] for a multiple of 8 channels (up to 64) with AVX2 compares and `movemask` (the same
/// operations in the same order: `scale * x`, `+ bias`, `max`/`min`, `> t`).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn sign_word64_avx2(x: &[f32], scale: &[f32], bias: &[f32], t: &[f32], act: u8) -> u64 {
    use std::arch::x86_64::*;
    let mut word = 0u64;
    for k in 0..x.len() / 8 {
        let o = 8 * k;
        let xv = _mm256_loadu_ps(x.as_ptr().add(o));
        let sv = _mm256_loadu_ps(scale.as_ptr().add(o));
        let bv = _mm256_loadu_ps(bias.as_ptr().add(o));
        let y = sbdnet_kernels::act256(_mm256_add_ps(_mm256_mul_ps(sv, xv), bv), act);
        let gt = _mm256_cmp_ps::<_CMP_GT_OQ>(y, _mm256_loadu_ps(t.as_ptr().add(o)));
        let m = (!_mm256_movemask_ps(gt)) as u64 & 0xff;
        word |= m << o;
    }
    word
}

/// One output pixel of [`direct_conv_fixed`] (any border).
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn conv_pixel<const CO: usize>(g: &ConvGeom, x: &[f32], wt: &[f32], b: usize, oy: usize, ox: usize, y: &mut [f32]) {
    let mut acc = [0.0f32; CO];
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
            let xr = &x[((b * g.h + iy as usize) * g.w + ix as usize) * g.cin..][..g.cin];
            let wr = &wt[(ky * g.kw + kx) * g.cin * CO..][..g.cin * CO];
            for (&xv, wrow) in xr.iter().zip(wr.chunks_exact(CO)) {
                let wrow: &[f32; CO] = wrow.try_into().expect("row");
                for j in 0..CO {
                    acc[j] = xv.mul_add(wrow[j], acc[j]);
                }
            }
        }
    }
    y[((b * g.oh + oy) * g.ow + ox) * CO..][..CO].copy_from_slice(&acc);
}

/// Direct convolution (zero padding, weights `[ky][kx][ci][co]`, raw sums into `y`, NHWC)
/// for a fixed channel count: the accumulators stay in registers, and
/// interior pixels (every tap inside the image) go four at a time so four independent sums
/// hide the add latency.
#[inline(always)]
fn direct_conv_fixed<const CO: usize>(g: &ConvGeom, x: &[f32], wt: &[f32], y: &mut [f32]) {
    let one = |b: usize, oy: usize, ox: usize, y: &mut [f32]| conv_pixel::<CO>(g, x, wt, b, oy, ox, y);
    // Interior output columns: ox * stride - pad >= 0 and ox * stride - pad + kw <= w.
    let lo = g.pad.div_ceil(g.stride);
    let hi = if g.w + g.pad >= g.kw { ((g.w + g.pad - g.kw) / g.stride + 1).min(g.ow) } else { 0 };
    for b in 0..g.batch {
        for oy in 0..g.oh {
            let row_inside = oy * g.stride >= g.pad && oy * g.stride + g.kh <= g.h + g.pad;
            if !row_inside || hi <= lo + 4 {
                for ox in 0..g.ow {
                    one(b, oy, ox, y);
                }
                continue;
            }
            for ox in 0..lo {
                one(b, oy, ox, y);
            }
            let mut ox = lo;
            while ox + 4 <= hi {
                let mut acc = [[0.0f32; CO]; 4];
                for ky in 0..g.kh {
                    let iy = oy * g.stride + ky - g.pad;
                    for kx in 0..g.kw {
                        let wr = &wt[(ky * g.kw + kx) * g.cin * CO..][..g.cin * CO];
                        for ci in 0..g.cin {
                            let wrow: &[f32; CO] = wr[ci * CO..][..CO].try_into().expect("row");
                            for (p, a) in acc.iter_mut().enumerate() {
                                let ix = (ox + p) * g.stride + kx - g.pad;
                                let xv = x[((b * g.h + iy) * g.w + ix) * g.cin + ci];
                                for j in 0..CO {
                                    a[j] = xv.mul_add(wrow[j], a[j]);
                                }
                            }
                        }
                    }
                }
                for (p, a) in acc.iter().enumerate() {
                    y[((b * g.oh + oy) * g.ow + ox + p) * CO..][..CO].copy_from_slice(a);
                }
                ox += 4;
            }
            for ox in ox..g.ow {
                one(b, oy, ox, y);
            }
        }
    }
}

/// [`direct_conv_fixed`] for 32 or 64 output channels, compiled with AVX2 and FMA where the
/// process uses the AVX2 path and the CPU has FMA (elsewhere `mul_add` is the library's
/// correctly rounded `fmaf`: the same results, slower).
fn direct_conv(g: &ConvGeom, x: &[f32], wt: &[f32], y: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if sbdnet_kernels::kernel_path() == sbdnet_kernels::KernelPath::Avx2 && is_x86_feature_detected!("fma") {
        #[target_feature(enable = "avx2,fma")]
        unsafe fn fast(g: &ConvGeom, x: &[f32], wt: &[f32], y: &mut [f32]) {
            if g.cout == 32 {
                direct_conv_fixed::<32>(g, x, wt, y)
            } else {
                direct_conv_fixed::<64>(g, x, wt, y)
            }
        }
        // SAFETY: the CPU reports AVX2 (the AVX2 path) and FMA.
        return unsafe { fast(g, x, wt, y) };
    }
    if g.cout == 32 {
        direct_conv_fixed::<32>(g, x, wt, y)
    } else {
        direct_conv_fixed::<64>(g, x, wt, y)
    }
}

/// The pointwise kernels on bits (dense word-major and sparse with skipped groups): one
/// way to run them, threaded over rows.
trait PointwiseBits: Sync {
    fn cin(&self) -> usize;
    fn cout(&self) -> usize;
    /// Integer dot products of `rows` pixels.
    fn dots(&self, x: &[u64], rows: usize, out: &mut [i32]);
    /// Packed sign bits through the kernel's thresholds (`scratch`: `cout` values).
    fn packed(&self, x: &[u64], rows: usize, out: &mut [u64], scratch: &mut [i32]);
    /// The layer + affine + pooling fused, for one image of `rows` pixels (where the kernel's
    /// `has_affine_gap` says it runs).
    fn affine_gap(&self, x: &[u64], rows: usize, scale: &[f32], bias: &[f32], act: u8, out: &mut [f32]);
    /// The dot products through a per-channel affine into `f32` in one pass, where the kernel
    /// has that form (`false`: nothing written).
    fn dots_affine(&self, _x: &[u64], _rows: usize, _aff: &binary::SumAffine, _out: &mut [f32]) -> bool {
        false
    }
}

impl PointwiseBits for PackedPointwise {
    fn cin(&self) -> usize {
        PackedPointwise::cin(self)
    }
    fn cout(&self) -> usize {
        PackedPointwise::cout(self)
    }
    fn dots(&self, x: &[u64], rows: usize, out: &mut [i32]) {
        self.forward(x, rows, out)
    }
    fn packed(&self, x: &[u64], rows: usize, out: &mut [u64], scratch: &mut [i32]) {
        self.forward_packed(x, rows, out, scratch)
    }
    fn affine_gap(&self, x: &[u64], rows: usize, scale: &[f32], bias: &[f32], act: u8, out: &mut [f32]) {
        self.forward_affine_gap(x, rows, scale, bias, act, out)
    }
    fn dots_affine(&self, x: &[u64], rows: usize, aff: &binary::SumAffine, out: &mut [f32]) -> bool {
        self.forward_affine(x, rows, aff, out)
    }
}

impl PointwiseBits for SparsePointwise {
    fn cin(&self) -> usize {
        SparsePointwise::cin(self)
    }
    fn cout(&self) -> usize {
        SparsePointwise::cout(self)
    }
    fn dots(&self, x: &[u64], rows: usize, out: &mut [i32]) {
        self.forward(x, rows, out)
    }
    fn packed(&self, x: &[u64], rows: usize, out: &mut [u64], _scratch: &mut [i32]) {
        self.forward_packed(x, rows, out)
    }
    fn affine_gap(&self, x: &[u64], rows: usize, scale: &[f32], bias: &[f32], act: u8, out: &mut [f32]) {
        self.forward_affine_gap(x, rows, scale, bias, act, out)
    }
}

/// The fused pointwise + affine + pooling of `n` images of `pixels` packed pixels each: the
/// pooled `n * cout` values at the start of `yf`.
#[allow(clippy::too_many_arguments)]
fn pointwise_gap(
    p: &impl PointwiseBits,
    xb: &[u64],
    n: usize,
    pixels: usize,
    scale: &[f32],
    bias: &[f32],
    act: Act,
    yf: &mut [f32],
) {
    let (wd, c) = (binary::words(p.cin()), p.cout());
    for b in 0..n {
        p.affine_gap(&xb[b * pixels * wd..][..pixels * wd], pixels, scale, bias, act as u8, &mut yf[b * c..][..c]);
    }
}

/// Run a pointwise kernel on `rows` packed pixels `xb` through its stage: packed bits
/// straight from the kernel for thresholds, else integer sums in `raw` and the stage.
fn run_pointwise(
    p: &impl PointwiseBits,
    stage: &Stage,
    xb: &[u64],
    rows: usize,
    raw: &mut [i32],
    yf: &mut [f32],
    yb: &mut [u64],
) {
    let (wd, od, co) = (binary::words(p.cin()), binary::words(p.cout()), p.cout());
    // Small layers (under about 2^20 word popcounts, tens of microseconds) stay on one
    // thread: waking another costs more than it saves.
    let chunk = if rows * wd * co < 1 << 20 { rows.max(1) } else { rows_per_thread(rows) };
    match stage {
        Stage::Threshold(_) => yb
            .par_chunks_mut(chunk * od)
            .zip(raw.par_chunks_mut(co))
            .enumerate()
            .for_each(|(k, (o, s))| p.packed(&xb[k * chunk * wd..], o.len() / od, o, s)),
        // The affine applied as the sums are stored (AVX-512, one chunk), no integer buffer.
        Stage::Affine { scale, bias, act }
            if chunk == rows
                && p.dots_affine(
                    xb,
                    rows,
                    &binary::SumAffine { scale, bias, act: *act as u8 },
                    &mut yf[..rows * co],
                ) => {}
        _ => {
            let raw = &mut raw[..rows * co];
            raw.par_chunks_mut(chunk * co)
                .enumerate()
                .for_each(|(k, o)| p.dots(&xb[k * chunk * wd..], o.len() / co, o));
            stage_i32(stage, raw, co, yf, yb);
        }
    }
}

/// Rows per parallel task: all of them on one thread (no task overhead at batch 1), else an
/// even split over the pool's threads.
fn rows_per_thread(rows: usize) -> usize {
    let t = sbdnet_kernels::threads();
    if t <= 1 || rows < 8 * t {
        rows.max(1)
    } else {
        rows.div_ceil(t)
    }
}

sbdnet_kernels::simd_kernel! {
    /// [`affine_rows_scaled`] that also finds `max |y|` into `m[0]` (as
    /// [`crate::int8::abs_max`]: NaN skipped), row by row while each row is in L1, so the next
    /// W1-A8 layer's quantization needs no pass of its own for it.
    pub(crate) fn affine_rows_scaled_max(
        x: &[f32],
        c: usize,
        k: f32,
        scale: &[f32],
        bias: &[f32],
        act: Act,
        y: &mut [f32],
        m: &mut [f32],
    ) {
        let mut max = crate::int8::AbsMax::default();
        for (yr, xr) in y.chunks_exact_mut(c).zip(x.chunks_exact(c)) {
            affine_body(xr, c, k, scale, bias, act, yr);
            max.add(yr);
        }
        m[0] = max.get();
    }
}

/// `y = act(scale[c] * x + bias[c])` over rows of `c` channels.
fn affine_rows(x: &[f32], c: usize, scale: &[f32], bias: &[f32], act: Act, y: &mut [f32]) {
    affine_rows_scaled(x, c, 1.0, scale, bias, act, y);
}

/// `y = act(scale[c] * (k * x) + bias[c])` over rows of `c` channels, the activation chosen
/// outside the loop so each loop vectorizes (inlined into the [`sbdnet_kernels::simd_kernel`]
/// functions that call it).
#[inline(always)]
fn affine_body(x: &[f32], c: usize, k: f32, scale: &[f32], bias: &[f32], act: Act, y: &mut [f32]) {
    #[inline(always)]
    fn run(x: &[f32], c: usize, k: f32, scale: &[f32], bias: &[f32], y: &mut [f32], f: impl Fn(f32) -> f32) {
        for (yr, xr) in y.chunks_exact_mut(c).zip(x.chunks_exact(c)) {
            for (((y, &x), &s), &b) in yr.iter_mut().zip(xr).zip(scale).zip(bias) {
                *y = f(s * (k * x) + b);
            }
        }
    }
    match act {
        Act::None => run(x, c, k, scale, bias, y, |v| Act::None.apply(v)),
        Act::Relu => run(x, c, k, scale, bias, y, |v| Act::Relu.apply(v)),
        Act::Hardtanh => run(x, c, k, scale, bias, y, |v| Act::Hardtanh.apply(v)),
    }
}

sbdnet_kernels::simd_kernel! {
    /// `y = act(scale[c] * (k * x) + bias[c])` over rows of `c` channels (`k = 1` is exact).
    /// The W1-A8 path passes an image's activation scale as `k`: the same two roundings as
    /// scaling the sums first, in one pass.
    fn affine_rows_scaled(x: &[f32], c: usize, k: f32, scale: &[f32], bias: &[f32], act: Act, y: &mut [f32]) {
        affine_body(x, c, k, scale, bias, act, y)
    }
}

sbdnet_kernels::simd_kernel! {
    /// `y = act(scale[c] * x + bias[c])` over rows of `c` integer sums (one loop per
    /// activation, so each vectorizes).
    fn affine_i32(raw: &[i32], c: usize, scale: &[f32], bias: &[f32], act: Act, out: &mut [f32]) {
        #[inline(always)]
        fn run(raw: &[i32], c: usize, scale: &[f32], bias: &[f32], out: &mut [f32], f: impl Fn(f32) -> f32) {
            for (yr, xr) in out.chunks_exact_mut(c).zip(raw.chunks_exact(c)) {
                for (((y, &x), &s), &b) in yr.iter_mut().zip(xr).zip(scale).zip(bias) {
                    *y = f(s * x as f32 + b);
                }
            }
        }
        match act {
            Act::None => run(raw, c, scale, bias, out, |v| Act::None.apply(v)),
            Act::Relu => run(raw, c, scale, bias, out, |v| Act::Relu.apply(v)),
            Act::Hardtanh => run(raw, c, scale, bias, out, |v| Act::Hardtanh.apply(v)),
        }
    }
}

sbdnet_kernels::simd_kernel! {
    /// Global average pooling of NHWC `x` (`pixels` per image, `c` channels) into `y`.
    fn gap_rows(x: &[f32], pixels: usize, c: usize, y: &mut [f32]) {
        for (b, yr) in y.chunks_exact_mut(c).enumerate() {
            yr.fill(0.0);
            for p in 0..pixels {
                for (y, &v) in yr.iter_mut().zip(&x[(b * pixels + p) * c..][..c]) {
                    *y += v;
                }
            }
            let inv = 1.0 / pixels as f32;
            yr.iter_mut().for_each(|v| *v *= inv);
        }
    }
}

/// Fuse a dense binary pointwise step with an affine stage into the global average pooling
/// that alone reads its output (where the kernel has the fused form: AVX-512).
fn fuse_pointwise_gap(steps: &mut [Step], info: &mut [StepInfo]) {
    for i in 0..steps.len().saturating_sub(1) {
        let value = i + 1;
        let readers = steps.iter().filter(|s| s.inputs.contains(&value)).count();
        let pooled_next = matches!(steps[i + 1].kernel, Kernel::Gap) && steps[i + 1].inputs == [value];
        let fusable = match &mut steps[i].kernel {
            Kernel::BinPw { p, stage: Stage::Affine { .. }, gap } => p.has_affine_gap().then_some(gap),
            Kernel::SparsePw { p, stage: Stage::Affine { .. }, gap } => p.has_affine_gap().then_some(gap),
            _ => None,
        };
        if let Some(gap) = fusable {
            if readers == 1 && pooled_next {
                *gap = true;
                steps[i + 1].kernel = Kernel::GapFused;
                info[i].kernel = steps[i].kernel.name();
                info[i + 1].kernel = steps[i + 1].kernel.name();
            }
        }
    }
}

/// Apply a stage to integer raw sums.
fn stage_i32(stage: &Stage, raw: &[i32], c: usize, out_f: &mut [f32], out_b: &mut [u64]) {
    match stage {
        Stage::Threshold(thr) => binary::threshold_pack(raw, c, thr, out_b),
        Stage::Affine { scale, bias, act } => affine_i32(raw, c, scale, bias, *act, out_f),
        Stage::Sign { scale, bias, act, t } => {
            let wd = binary::words(c);
            for (or, xr) in out_b.chunks_exact_mut(wd).zip(raw.chunks_exact(c)) {
                or.fill(0);
                for (ch, (((&x, &s), &b), &t)) in xr.iter().zip(scale).zip(bias).zip(t).enumerate() {
                    let pos = act.apply(s * x as f32 + b) > t;
                    or[ch / 64] |= u64::from(!pos) << (ch % 64);
                }
            }
        }
    }
}

/// The most values one buffer of a plan may hold (1 GiB of `f32`; activations, and the
/// unfolded input of a convolution, `k * k` times larger): a larger batch is refused by
/// [`Plan::new`] instead of failing to allocate.
pub const MAX_BATCH_VALUES: usize = 1 << 28;

impl Plan {
    /// Plan `model` for batches of up to `batch` images.
    pub fn new(model: &DeployedModel, batch: usize, opts: PlanOptions) -> Result<Plan, RuntimeError> {
        let batch = batch.max(1);
        let t = &model.tensors;
        let vals = &model.values;
        // Per image: every value, and every convolution's unfolded input (the largest scratch,
        // `k * k` times its input).
        let largest = vals.iter().map(|v| v.h.saturating_mul(v.w).saturating_mul(v.c)).max().unwrap_or(1);
        let unfolded = model.graph.layers.iter().enumerate().filter_map(|(i, l)| match &l.op {
            Op::Conv(cv) => {
                let y = vals.get(i + 1)?;
                Some(y.h.saturating_mul(y.w).saturating_mul(cv.k * cv.k).saturating_mul(cv.cin))
            }
            _ => None,
        });
        let largest = unfolded.fold(largest, usize::max);
        let values = largest.saturating_mul(batch);
        if values > MAX_BATCH_VALUES {
            return Err(RuntimeError::Batch { batch, values, limit: MAX_BATCH_VALUES });
        }
        let mut steps = Vec::new();
        let mut info = Vec::new();
        let (mut raw_len, mut col_len, mut scratch_len, mut unpacked_len) = (0usize, 0usize, 0usize, 0usize);
        let mut quant = QuantScratch::default();
        for (i, l) in model.graph.layers.iter().enumerate() {
            let name = l.name.as_str();
            let (x, y) = (vals[l.inputs[0]], vals[i + 1]);
            let (mut bmacs, mut amacs, mut fmacs) = (0u64, 0u64, 0u64);
            let mut lookups = (0u64, 0u64);
            let kernel = match &l.op {
                Op::Conv(cv) => {
                    let g = ConvGeom::new(batch, x.h, x.w, cv.cin, cv.cout, cv.k, cv.stride, cv.pad, cv.groups)
                        .ok_or_else(|| graph_err(name, "convolution geometry"))?;
                    let macs = (y.h * y.w * cv.cout * cv.k * cv.k * (cv.cin / cv.groups)) as u64;
                    let stage = stage_of(model, name, &cv.output, cv.cout)?;
                    raw_len = raw_len.max(g.out_len());
                    match (&cv.weights, x.kind) {
                        (Weights::Binary { bits, mask: None, .. }, Kind::Bits) => {
                            bmacs = macs;
                            let w = u64s(t, name, bits, crate::graph::binary_weight_words(cv))?.to_vec();
                            if cv.depthwise() {
                                let packed = match &stage {
                                    Stage::Threshold(thr) => Some(DwThresholds::new(thr)),
                                    _ => None,
                                };
                                Kernel::BinDw { g, w, stage, packed, zero: None }
                            } else if cv.k == 1 && cv.stride == 1 && cv.pad == 0 {
                                let mut p = PackedPointwise::new(cv.cin, cv.cout, &w);
                                if let Stage::Threshold(thr) = &stage {
                                    p = p.with_thresholds(thr);
                                }
                                Kernel::BinPw { p, stage, gap: false }
                            } else {
                                Kernel::BinConv { g, w, stage }
                            }
                        }
                        (Weights::Binary { bits, mask: Some(mask), group_size }, Kind::Bits) => {
                            bmacs = macs;
                            let (_, total) =
                                crate::graph::mask_groups(cv, *group_size).map_err(|e| graph_err(name, e))?;
                            let m = crate::graph::u8s(t, name, mask, total)?;
                            let w = u64s(t, name, bits, crate::graph::binary_weight_words(cv))?.to_vec();
                            if cv.depthwise() {
                                let c = cv.cout;
                                let mut zero = ZeroChannels {
                                    zero: vec![0; binary::words(c)],
                                    value: vec![0; binary::words(c)],
                                    list: Vec::new(),
                                };
                                for (ch, &keep) in m.iter().enumerate() {
                                    if keep == 0 {
                                        zero.zero[ch / 64] |= 1 << (ch % 64);
                                        zero.list.push(ch);
                                        if let Stage::Threshold(thr) = &stage {
                                            zero.value[ch / 64] |= u64::from(thr[ch].bit(0)) << (ch % 64);
                                        }
                                    }
                                }
                                let packed = match &stage {
                                    Stage::Threshold(thr) => Some(DwThresholds::new(thr)),
                                    _ => None,
                                };
                                // No pruned kernel: nothing to patch after the dense kernel.
                                let zero = (!zero.list.is_empty()).then_some(zero);
                                Kernel::BinDw { g, w, stage, packed, zero }
                            } else if cv.k == 1 && cv.stride == 1 && cv.pad == 0 {
                                let gs = group_size.unwrap_or(1);
                                let mut p = SparsePointwise::new(cv.cin, cv.cout, &w, m, gs);
                                bmacs = (y.h * y.w * p.kept_weights()) as u64;
                                if let Stage::Threshold(thr) = &stage {
                                    p = p.with_thresholds(thr);
                                }
                                Kernel::SparsePw { p, stage, gap: false }
                            } else {
                                // Other sparse k x k layers: the input bits as +-1 floats through
                                // the float convolution with +-1 / 0 weights (exact integer sums).
                                let w = crate::reference::conv_weights_f32(model, name, cv)?;
                                col_len = col_len.max(g.col_len());
                                scratch_len = scratch_len.max(g.kh * g.kw * g.cin);
                                unpacked_len = unpacked_len.max(g.in_len());
                                Kernel::SparseConvBits { g, w, stage }
                            }
                        }
                        (Weights::Binary { .. }, Kind::F32) if opts.a8 == A8Mode::Int8 => {
                            amacs = macs;
                            let w = crate::reference::conv_weights_f32(model, name, cv)?;
                            let conv = A8Conv::new(g, &w);
                            quant.reserve(&conv);
                            lookups = conv.lookup_counts().unwrap_or_default();
                            Kernel::A8 { conv, stage }
                        }
                        (Weights::Float { .. }, Kind::F32)
                            if cv.groups == 1 && cv.cin * cv.k * cv.k <= 64 && matches!(cv.cout, 32 | 64) =>
                        {
                            fmacs = macs;
                            let w = crate::reference::conv_weights_f32(model, name, cv)?;
                            let kt = cv.k * cv.k * cv.cin;
                            let mut wt = vec![0.0; kt * cv.cout];
                            for co in 0..cv.cout {
                                for k in 0..kt {
                                    wt[k * cv.cout + co] = w[co * kt + k];
                                }
                            }
                            // The AVX-512 kernel adds `0 * w` for padding taps: finite weights only.
                            let avx512 = crate::conv_sign::available() && wt.iter().all(|v| v.is_finite());
                            let fused = match &stage {
                                Stage::Sign { scale, bias, act, t } if avx512 => {
                                    let st = crate::conv_sign::SignStage { scale, bias, t, act: *act as u8 };
                                    crate::conv_sign::fold(&wt, cv.cout, &st)
                                }
                                _ => None,
                            };
                            let affine512 = avx512 && matches!(stage, Stage::Affine { .. });
                            if fused.is_some() || affine512 {
                                unpacked_len = unpacked_len.max(crate::conv_sign::padded_len(&g));
                            }
                            if affine512 {
                                quant.known_at_least(batch);
                            }
                            Kernel::SmallConv { g, wt, stage, fused, affine512 }
                        }
                        (_, Kind::F32) => {
                            fmacs = macs;
                            let w = crate::reference::conv_weights_f32(model, name, cv)?;
                            col_len = col_len.max(g.col_len());
                            scratch_len = scratch_len.max(g.kh * g.kw * g.cin);
                            Kernel::FloatConv { g, w, stage }
                        }
                        (Weights::Float { .. }, Kind::Bits) => {
                            return Err(graph_err(name, "float weights on bits"));
                        }
                    }
                }
                Op::Linear { inp, out, weight, bias } => {
                    fmacs = (inp * out) as u64;
                    let b = match bias {
                        Some(b) => Some(f32s(t, name, b, *out)?.to_vec()),
                        None => None,
                    };
                    // Transposed to [inp][out]: the outputs' sums advance together (independent
                    // chains), each still adding its products in input order.
                    let w = f32s(t, name, weight, inp * out)?;
                    let mut wt = vec![0.0; inp * out];
                    for o in 0..*out {
                        for i in 0..*inp {
                            wt[i * out + o] = w[o * inp + i];
                        }
                    }
                    Kernel::Linear { inp: *inp, out: *out, wt, b }
                }
                Op::Binarize { t: th } => Kernel::Binarize { t: f32s(t, name, th, x.c)?.to_vec() },
                Op::Affine { scale, bias, act } => Kernel::Affine {
                    scale: f32s(t, name, scale, x.c)?.to_vec(),
                    bias: f32s(t, name, bias, x.c)?.to_vec(),
                    act: *act,
                },
                Op::Activation { act } => Kernel::Activation(*act),
                Op::Pool { k, stride, max } => Kernel::Pool { k: *k, stride: *stride, max: *max },
                Op::GlobalAvgPool => Kernel::Gap,
                Op::Flatten => Kernel::Copy,
                Op::Add => Kernel::Add,
            };
            info.push(StepInfo {
                name: l.name.clone(),
                kernel: kernel.name(),
                out: [y.h, y.w, y.c],
                bits_out: y.kind == Kind::Bits,
                binary_macs: bmacs,
                addsub_macs: amacs,
                float_macs: fmacs,
                lookups: lookups.0,
                lookup_adds: lookups.1,
                ns: 0,
                min_ns: u64::MAX,
            });
            steps.push(Step { inputs: l.inputs.clone(), kernel });
        }
        fuse_pointwise_gap(&mut steps, &mut info);
        let mut f32_bufs = Vec::new();
        let mut bit_bufs = Vec::new();
        for v in vals {
            match v.kind {
                Kind::F32 => {
                    f32_bufs.push(vec![0.0; batch * v.len()]);
                    bit_bufs.push(Vec::new());
                }
                Kind::Bits => {
                    f32_bufs.push(Vec::new());
                    bit_bufs.push(vec![0; batch * v.storage()]);
                }
            }
        }
        Ok(Plan {
            steps,
            values: vals.clone(),
            batch,
            f32_bufs,
            bit_bufs,
            raw_i32: vec![0; raw_len],
            raw_f32: vec![0.0; raw_len],
            col: vec![0.0; col_len],
            scratch: vec![0.0; scratch_len],
            unpacked: vec![0.0; unpacked_len],
            quant,
            info,
            profile: false,
            runs: 0,
        })
    }

    /// The largest batch this plan runs.
    pub fn batch(&self) -> usize {
        self.batch
    }

    /// Runs since planning (profiling divides by it).
    pub fn runs(&self) -> u64 {
        self.runs
    }

    /// Run `n` images (`x`: `n * h * w * c` normalized `f32`, `n <= batch`); returns the
    /// `n * classes` scores.
    pub fn run(&mut self, x: &[f32], n: usize) -> Result<&[f32], RuntimeError> {
        let il = self.values[0].len();
        if n == 0 || n > self.batch || x.len() != n * il {
            return Err(RuntimeError::Input { got: x.len(), expected: il, batch: n.min(self.batch) });
        }
        self.f32_bufs[0][..x.len()].copy_from_slice(x);
        for i in 0..self.steps.len() {
            let t0 = self.profile.then(Instant::now);
            self.step(i, n);
            if let Some(t0) = t0 {
                let ns = t0.elapsed().as_nanos() as u64;
                self.info[i].ns += ns;
                self.info[i].min_ns = self.info[i].min_ns.min(ns);
            }
        }
        self.runs += 1;
        let last = self.values.len() - 1;
        Ok(&self.f32_bufs[last][..n * self.values[last].len()])
    }

    fn step(&mut self, i: usize, n: usize) {
        let step = &self.steps[i];
        let (xi, yo) = (self.values[step.inputs[0]], self.values[i + 1]);
        let a = step.inputs[0];
        // Split the buffers: inputs have smaller indices than the output.
        let (f_lo, f_hi) = self.f32_bufs.split_at_mut(i + 1);
        let (b_lo, b_hi) = self.bit_bufs.split_at_mut(i + 1);
        let xf: &[f32] = if xi.kind == Kind::F32 { &f_lo[a][..n * xi.len()] } else { &[] };
        let xb: &[u64] = if xi.kind == Kind::Bits { &b_lo[a][..n * xi.storage()] } else { &[] };
        let yf = &mut f_hi[0];
        let yb = &mut b_hi[0];
        let yf_len = if yo.kind == Kind::F32 { n * yo.len() } else { 0 };
        let yb_len = if yo.kind == Kind::Bits { n * yo.storage() } else { 0 };
        let (yf, yb) = (&mut yf[..yf_len], &mut yb[..yb_len]);
        match &step.kernel {
            Kernel::SmallConv { g, fused: Some(f), .. } => {
                let g = ConvGeom { batch: n, ..*g };
                crate::conv_sign::conv_sign(&g, xf, f, &mut self.unpacked, yb);
            }
            Kernel::SmallConv { g, wt, stage: Stage::Affine { scale, bias, act }, affine512: true, .. } => {
                let g = ConvGeom { batch: n, ..*g };
                let st = crate::conv_sign::AffineStage { scale, bias, act: *act as u8 };
                crate::conv_sign::conv_affine(&g, xf, wt, &st, &mut self.unpacked, yf, &mut self.quant.known[..n]);
                self.quant.known_for = Some(i + 1);
                self.quant.known_ch_valid = false;
            }
            Kernel::SmallConv { g, wt, stage, .. } => {
                let g = ConvGeom { batch: n, ..*g };
                let raw = &mut self.raw_f32[..g.out_len()];
                direct_conv(&g, xf, wt, raw);
                stage_f32(stage, raw, g.cout, yf, yb);
            }
            Kernel::FloatConv { g, w, stage } => {
                let g = ConvGeom { batch: n, ..*g };
                let raw = &mut self.raw_f32[..g.out_len()];
                conv2d_forward(&g, xf, w, raw, &mut self.col, &mut self.scratch);
                stage_f32(stage, raw, g.cout, yf, yb);
            }
            Kernel::BinPw { p, stage: Stage::Affine { scale, bias, act }, gap: true } => {
                pointwise_gap(p, xb, n, yo.h * yo.w, scale, bias, *act, yf)
            }
            Kernel::SparsePw { p, stage: Stage::Affine { scale, bias, act }, gap: true } => {
                pointwise_gap(p, xb, n, yo.h * yo.w, scale, bias, *act, yf)
            }
            Kernel::BinPw { p, stage, .. } => run_pointwise(p, stage, xb, n * yo.h * yo.w, &mut self.raw_i32, yf, yb),
            Kernel::GapFused => yf.copy_from_slice(&xf[..yf.len()]),
            Kernel::SparseConvBits { g, w, stage } => {
                let g = ConvGeom { batch: n, ..*g };
                let x = &mut self.unpacked[..g.in_len()];
                binary::unpack(xb, g.cin, x);
                let raw = &mut self.raw_f32[..g.out_len()];
                conv2d_forward(&g, x, w, raw, &mut self.col, &mut self.scratch);
                let ints = &mut self.raw_i32[..g.out_len()];
                for (i, &v) in ints.iter_mut().zip(raw.iter()) {
                    *i = v as i32;
                }
                stage_i32(stage, ints, g.cout, yf, yb);
            }
            Kernel::BinConv { g, w, stage } => {
                let g = ConvGeom { batch: n, ..*g };
                let raw = &mut self.raw_i32[..g.out_len()];
                binary::bconv_forward(&g, xb, w, raw);
                stage_i32(stage, raw, g.cout, yf, yb);
            }
            Kernel::SparsePw { p, stage, .. } => {
                run_pointwise(p, stage, xb, n * yo.h * yo.w, &mut self.raw_i32, yf, yb)
            }
            Kernel::BinDw { g, w, stage, packed, zero } => {
                let g = ConvGeom { batch: n, ..*g };
                match packed {
                    Some(p) => {
                        binary::bdw_forward_packed(&g, xb, w, p, yb);
                        if let Some(z) = zero {
                            let wd = z.zero.len();
                            for px in yb.chunks_exact_mut(wd) {
                                for ((o, &zm), &v) in px.iter_mut().zip(&z.zero).zip(&z.value) {
                                    *o = (*o & !zm) | v;
                                }
                            }
                        }
                    }
                    None => {
                        if let (Stage::Affine { scale, bias, act }, None) = (stage, zero) {
                            // The affine applied as the sums are written (AVX-512), no
                            // integer buffer.
                            let aff = binary::SumAffine { scale, bias, act: *act as u8 };
                            if binary::bdw_forward_affine(&g, xb, w, &aff, yf) {
                                return;
                            }
                        }
                        let raw = &mut self.raw_i32[..g.out_len()];
                        binary::bdw_forward(&g, xb, w, raw);
                        if let Some(z) = zero {
                            for px in raw.chunks_exact_mut(g.cout) {
                                for &ch in &z.list {
                                    px[ch] = 0;
                                }
                            }
                        }
                        stage_i32(stage, raw, g.cout, yf, yb);
                    }
                }
            }
            Kernel::A8 { conv, stage } => {
                let raw = &mut self.raw_f32[..n * yo.len()];
                let known = self.quant.known_for == Some(a);
                match stage {
                    Stage::Affine { scale, bias, act } if conv.fuses_affine() => {
                        // The affine applied by the kernel as it stores each sum; it also finds
                        // the output's max |y| for the next W1-A8 layer's quantization.
                        conv.forward_affine(n, xf, yf, &mut self.quant, known, scale, bias, *act);
                        self.quant.known_for = Some(i + 1);
                    }
                    Stage::Affine { scale, bias, act } => {
                        // The image's activation scale applied inside the affine pass, which
                        // also finds the output's max |y| for the next layer's quantization.
                        conv.forward_raw(n, xf, raw, &mut self.quant, known);
                        let ol = yo.len();
                        for (b, (rb, yb)) in raw.chunks_exact(ol).zip(yf.chunks_exact_mut(ol)).enumerate() {
                            let k = self.quant.image_scale(b);
                            let mut m = [0.0f32];
                            affine_rows_scaled_max(rb, yo.c, k, scale, bias, *act, yb, &mut m);
                            self.quant.known[b] = m[0];
                        }
                        self.quant.known_for = Some(i + 1);
                    }
                    _ => {
                        conv.forward(n, xf, raw, &mut self.quant, known);
                        stage_f32(stage, raw, yo.c, yf, yb);
                    }
                }
            }
            Kernel::Linear { inp, out, wt, b } => {
                for (xr, yr) in xf.chunks_exact(*inp).zip(yf.chunks_exact_mut(*out)) {
                    yr.fill(0.0);
                    for (&a, wr) in xr.iter().zip(wt.chunks_exact(*out)) {
                        for (s, &w) in yr.iter_mut().zip(wr) {
                            *s += a * w;
                        }
                    }
                    if let Some(b) = b {
                        for (s, &bv) in yr.iter_mut().zip(b) {
                            *s += bv;
                        }
                    }
                }
            }
            Kernel::Binarize { t } => binary::pack_thresholded(xf, xi.c, t, yb),
            Kernel::Affine { scale, bias, act } => affine_rows(xf, xi.c, scale, bias, *act, yf),
            Kernel::Activation(act) => act_into(xf, yf, *act),
            Kernel::Pool { k, stride, max } => {
                let dims = [n, xi.h, xi.w, yo.h, yo.w, yo.c, *k, *stride];
                if *max {
                    pool_into::<true>(xf, yf, dims);
                } else {
                    pool_into::<false>(xf, yf, dims);
                }
            }
            Kernel::Gap => gap_rows(xf, xi.h * xi.w, xi.c, yf),
            Kernel::Copy => yf.copy_from_slice(xf),
            Kernel::Add => add_into(xf, &f_lo[step.inputs[1]][..yf.len()], yf),
        }
    }
}

sbdnet_kernels::simd_kernel! {
    /// `y = act(x)` (the variant matched once, outside the loop).
    fn act_into(x: &[f32], y: &mut [f32], act: Act) {
        match act {
            Act::None => y.copy_from_slice(&x[..y.len()]),
            Act::Relu => y.iter_mut().zip(x).for_each(|(y, &v)| *y = Act::Relu.apply(v)),
            Act::Hardtanh => y.iter_mut().zip(x).for_each(|(y, &v)| *y = Act::Hardtanh.apply(v)),
        }
    }
}

sbdnet_kernels::simd_kernel! {
    /// `y = p + q`.
    fn add_into(p: &[f32], q: &[f32], y: &mut [f32]) {
        for ((y, &p), &q) in y.iter_mut().zip(p).zip(q) {
            *y = p + q;
        }
    }
}

/// `k x k` pooling at `stride`, no padding, NHWC; `dims` = `[n, h, w, oh, ow, c, k, stride]`.
/// Average: the window's sum in tap order, times `1 / k^2`; max: `f32::max` from `-inf`.
fn pool_into<const MAX: bool>(x: &[f32], y: &mut [f32], dims: [usize; 8]) {
    #[inline(always)]
    fn body<const MAX: bool>(x: &[f32], y: &mut [f32], dims: [usize; 8]) {
        let [n, h, w, oh, ow, c, k, stride] = dims;
        let inv = 1.0 / (k * k) as f32;
        for b in 0..n {
            for oy in 0..oh {
                for ox in 0..ow {
                    let yr = &mut y[((b * oh + oy) * ow + ox) * c..][..c];
                    yr.fill(if MAX { f32::NEG_INFINITY } else { 0.0 });
                    for ky in 0..k {
                        for kx in 0..k {
                            let xr = &x[((b * h + oy * stride + ky) * w + ox * stride + kx) * c..][..c];
                            for (y, &v) in yr.iter_mut().zip(xr) {
                                *y = if MAX { y.max(v) } else { *y + v };
                            }
                        }
                    }
                    if !MAX {
                        yr.iter_mut().for_each(|v| *v *= inv);
                    }
                }
            }
        }
    }
    sbdnet_kernels::dispatch::with_simd(|| body::<MAX>(x, y, dims))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The max the fused affine pass hands to the next W1-A8 layer is exactly the max its
    /// quantization would find itself (NaN skipped, signed zeros, rows not a multiple of 8).
    #[test]
    fn affine_max_equals_the_quantizers_max() {
        let mut r = sbdnet_kernels::rng::Rng::new(3);
        for case in 0..40 {
            let (c, rows) = (1 + r.below(40), 1 + r.below(9));
            let x: Vec<f32> = (0..c * rows)
                .map(|_| match r.below(12) {
                    0 => f32::NAN,
                    1 => -0.0,
                    _ => r.normal() * 3.0,
                })
                .collect();
            let scale: Vec<f32> = (0..c).map(|_| r.normal()).collect();
            let bias: Vec<f32> = (0..c).map(|_| r.normal()).collect();
            let act = [Act::None, Act::Relu, Act::Hardtanh][case % 3];
            let k = 0.01 + r.uniform();
            let (mut y, mut y2) = (vec![0.0; c * rows], vec![0.0; c * rows]);
            let mut m = [f32::NAN];
            affine_rows_scaled_max(&x, c, k, &scale, &bias, act, &mut y, &mut m);
            affine_rows_scaled(&x, c, k, &scale, &bias, act, &mut y2);
            assert_eq!(
                y.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                y2.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
            );
            let mut want = [0.0f32];
            crate::int8::abs_max(&y, &mut want);
            assert_eq!(m[0].to_bits(), want[0].to_bits(), "case {case}: c {c} rows {rows}");
        }
    }
}

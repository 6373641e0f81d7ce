//! The W1-A8 path: binary weights on 8-bit activations with additions and subtractions only
//! (the paper's multiplication-less form, `y = sum_{w=+1} x - sum_{w=-1} x`).
//!
//! - Activations are quantized per image (one scale for the tensor: `q = round(x * 127 /
//!   max|x|)`, `|q| <= 127`); a depthwise layer's input gets one scale per image and channel
//!   instead (`max_c |x|`: each output channel reads one input channel, so its integer sums
//!   stay exact, and a channel of small values keeps its resolution beside one of large
//!   values; group-pruned models have both, and with one scale per tensor a sparse MNIST
//!   model fell from 99.20% to 98.16%). That and the layer's per-channel affine afterwards
//!   (which takes the per-channel scale) are the only multiplications, one per activation
//!   element.
//! - Weights are stored as 16-bit AND-masks: `wp = 0xFFFF` where the weight is `+1`, `wn =
//!   0xFFFF` where it is `-1` (both `0` in a zero group of a sparse layer). A
//!   multiply-accumulate is then `acc += (x & wp) - (x & wn)`, or, for a layer without zeros,
//!   `acc += x & wp` and one `y = 2 * acc - sum(x)` at the end (`2 *` is a shift).
//! - Accumulators are 16-bit lanes (16 per AVX2 register), widened into 32-bit sums every 256
//!   input channels (`256 * 127 < 2^15`), so no partial sum overflows.
//!
//! - On AVX-512 (BW + VL), the kernels use `k`-mask registers for the signs (a masked 16-bit
//!   add per 32 channels), and a dense (non-depthwise) layer with at least [`LUT_MIN_COUT`]
//!   outputs ([`LUT_MIN_COUT_ZEROS`] with zero weights) looks sums up instead of adding them
//!   one by one: for each pixel and each group of 5 consecutive inputs, a 32-entry table of
//!   16-bit subset sums `T[e] = sum_{bit i of e} x_i` (built with 5 masked additions) is
//!   indexed per output channel by the 5 sign bits of its weights (`vpermb` with VBMI, else
//!   `vpermw`: 32 channels' lookups in one instruction), so one lookup and one addition
//!   replace 5 additions; `y = 2 * sum T[idx] - sum x` as above, or `sum T[e+] - sum T[e-]`
//!   with a second index set where the layer has zeros. Runs of 51 groups
//!   (`51 * 5 * 127 < 2^15`) are widened into 32-bit sums. No multiplication either way.
//!   These kernels also apply the layer's affine as they store (`A8Conv::forward_affine`),
//!   and pointwise layers quantize their input as they read it.
//!
//! The loops are written over fixed-size blocks so the compiler keeps the accumulators in
//! registers; [`sbdnet_kernels::simd_kernel`] compiles them for AVX2 when the CPU has it (and
//! `SBDNET_KERNEL=portable` forces the baseline build).

use crate::graph::Act;
use sbdnet_kernels::conv::ConvGeom;

#[cfg(target_arch = "x86_64")]
mod avx2;

/// Stand-ins where there is no AVX2: never planned ([`avx2::available`] is false).
#[cfg(not(target_arch = "x86_64"))]
mod avx2 {
    use sbdnet_kernels::conv::ConvGeom;
    pub fn available() -> bool {
        false
    }
    pub fn dw_slack(_: &ConvGeom) -> usize {
        0
    }
    pub unsafe fn dw_image(_: &ConvGeom, _: &[i16], _: &[i16], _: &mut super::Out) {
        unreachable!("sign layouts are planned only on x86_64")
    }
    pub unsafe fn channel_abs_max(_: &[f32], _: &mut [f32]) {
        unreachable!("AVX2 only")
    }
    pub unsafe fn quantize_channels(_: &[f32], _: &mut [i16], _: &[f32]) {
        unreachable!("AVX2 only")
    }
    pub unsafe fn quantize_into(_: &[f32], _: &mut [i16], _: f32) {
        unreachable!("AVX2 only")
    }
    pub const PX: usize = 64;
    pub const MIN_PIXELS: usize = 16;
    #[derive(Clone, Debug)]
    pub struct Lists;
    impl Lists {
        pub fn new(_: usize, _: usize, _: &[f32]) -> Lists {
            unreachable!("AVX2 only")
        }
        pub fn rows(&self) -> usize {
            0
        }
    }
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn pw_rows(
        _: super::Rows,
        _: usize,
        _: usize,
        _: &Lists,
        _: &mut super::Out,
        _: &mut [i16],
        _: &mut [f32],
    ) {
        unreachable!("AVX2 only")
    }
}

/// Output channels per register block of the pointwise kernel.
const CO_BLOCK: usize = 64;
/// Input channels per 16-bit accumulation run.
const CI_RUN: usize = 256;
/// Fewest output channels for which a dense AVX-512 layer uses the lookup kernel: a table
/// costs 5 additions per pixel and group of 5 inputs, and saves 4 instructions per block of
/// 32 outputs, so narrow layers gain nothing.
pub const LUT_MIN_COUT: usize = 128;
/// The same for a layer with zero weights (a sparse export): there the additions cost two
/// instructions per input (an add under the `+1` mask, a subtract under the `-1` mask)
/// against two lookups per 5 inputs, so tables pay earlier.
pub const LUT_MIN_COUT_ZEROS: usize = 64;

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
    /// The weights' signs in the form the chosen kernels read.
    signs: Signs,
    /// Some weight is zero (a sparse layer): use `P - N` instead of `2P - S`.
    zeros: bool,
}

/// Where the `+1` and the `-1` weights are, one layout per kernel family (only the one the
/// plan runs is built).
#[derive(Clone, Debug)]
enum Signs {
    /// 16-bit AND-masks (`-1` where set) for the portable/AVX2 loops. Dense/pointwise:
    /// `[co_block][k_total][CO_BLOCK]`; depthwise: `[tap][c]`.
    Wide { wp: Vec<i16>, wn: Vec<i16> },
    /// Bit masks for the AVX-512 (BW) kernels ([`avx512`]): dense/pointwise
    /// `[k][block of 32 channels]`, depthwise `[tap][block]`.
    Bits { mp: Vec<u32>, mn: Vec<u32> },
    /// Lookup indices for the AVX-512 (BW) table kernel ([`avx512::lut_rows`]), dense layers
    /// without zeros: `[group of 5 inputs][block of 32 channels][32 lanes]`, each lane the
    /// channel's 5 `+1` bits `e`; a layer with zero weights has a second such array after
    /// it with the `-1` bits (`y = sum T[e+] - sum T[e-]`). With `bytes` (AVX-512 VBMI) a lane holds the byte pair
    /// `(e, e + 32)`: the tables are stored as 32 low bytes then 32 high bytes, and one byte
    /// permute (`vpermb`, cheaper than `vpermw`) fetches both bytes of every channel's entry.
    Lut { ix: Vec<u16>, bytes: bool },
    /// Weights as `+1`, `-1`, `0` for the AVX2 sign-apply kernels ([`avx2`]): depthwise
    /// `[tap][c padded to 16]`.
    Sign { w: Vec<i16> },
    /// Per output channel, the inputs to add and to subtract, for the AVX2 pointwise kernel
    /// ([`avx2::pw_rows`]: 64 pixels per register set, transposed on the way in and out).
    List(avx2::Lists),
}

/// Which sign layout (and so which kernel) a layer gets; `Auto` is what plans use (the
/// others let tests and benchmarks pin one kernel).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Layout {
    /// The fastest the machine and the layer allow.
    Auto,
    /// 16-bit AND-masks (portable / AVX2).
    Wide,
    /// AVX-512 bit masks (requires `avx512::available()`).
    Bits,
    /// AVX-512 lookup tables (requires `avx512::available()`, not depthwise), with byte
    /// permutes (`true`, requires `avx512::vbmi()`) or 16-bit ones.
    Lut(bool),
    /// The AVX2 kernels (requires [`avx2_available`]; depthwise: sign-apply, pointwise:
    /// input lists; not other dense layers).
    Sign,
}

/// Reusable buffers of the W1-A8 kernels, sized at plan time.
#[derive(Clone, Debug, Default)]
pub struct QuantScratch {
    q: Vec<i16>,
    /// A depthwise AVX-512 layer's input, quantized into a zero border (`n` images, then
    /// the kernel's slack).
    qpad: Vec<i16>,
    col: Vec<i16>,
    /// The lookup kernel's tables: `avx512::ROWS` pixels x groups x 32 entries.
    lut: Vec<i16>,
    scale: Vec<f32>,
    acc: Vec<i16>,
    /// Activations of a few pixels as 32-bit words holding the value twice (one load
    /// broadcasts it to 32 16-bit lanes).
    dup: Vec<i32>,
    /// Per image: `127 / max |x|` where a pointwise AVX-512 layer quantizes its input on
    /// the fly (no pass writing `q`), else 0.
    inv: Vec<f32>,
    /// `max |x|` per image of the value `known_for` (the plan's value index), written by
    /// the pass that produced it, so the quantization of that value skips its own max pass.
    pub known: Vec<f32>,
    /// The value `known` describes.
    pub known_for: Option<usize>,
    /// Per image and channel, `max |x|` of the same value, where `known_ch_valid`: written by
    /// the fused affine of the layer that produced it (the passes that find only the whole
    /// tensor's max clear the flag), so a depthwise layer's per-channel scales need no pass.
    known_ch: Vec<f32>,
    /// Whether `known_ch` describes the value `known_for` names.
    pub known_ch_valid: bool,
    /// A depthwise layer's per-channel activation scales (`max_c |x| / 127`), `n x cin`.
    cscale: Vec<f32>,
    /// Their inverses for one image (`127 / max_c |x|`, 0 for a channel quantized to zeros).
    cinv: Vec<f32>,
    /// The AVX2 pointwise kernel's transposed buffers.
    planar: Planar,
}

/// Buffers of [`avx2::pw_rows`]: 64 pixels of input transposed (`[k][64]`) and the outputs
/// before they are transposed back (`[cout][64]`).
#[derive(Clone, Debug, Default)]
struct Planar {
    x: Vec<i16>,
    y: Vec<f32>,
}

impl QuantScratch {
    /// Room for `batch` images' known maxima.
    pub fn known_at_least(&mut self, batch: usize) {
        grow(&mut self.known, batch);
    }

    /// The activation scale of image `b` of the last [`A8Conv::forward_raw`].
    pub fn image_scale(&self, b: usize) -> f32 {
        self.scale[b]
    }

    /// Grow to fit `c` (called once per layer at plan time).
    pub fn reserve(&mut self, c: &A8Conv) {
        let g = &c.g;
        grow(&mut self.q, g.in_len());
        grow(&mut self.scale, g.batch);
        grow(&mut self.inv, g.batch);
        grow(&mut self.known, g.batch);
        grow(&mut self.acc, g.cin);
        if c.fuses_affine() {
            grow(&mut self.known_ch, g.batch * g.cout);
        }
        if c.kind == A8Kind::Depthwise {
            grow(&mut self.cscale, g.batch * g.cin);
            grow(&mut self.cinv, g.cin);
        }
        if c.padded() {
            grow(&mut self.qpad, g.batch * c.padded_len() + avx512::dw_slack(g).max(avx2::dw_slack(g)));
        }
        if c.kind == A8Kind::Dense {
            grow(&mut self.col, g.out_rows() * g.kh * g.kw * g.cin);
        }
        if matches!(c.signs, Signs::Bits { .. } | Signs::Lut { .. }) {
            grow(&mut self.dup, avx512::ROWS * g.kh * g.kw * g.cin);
        }
        if let Signs::List(l) = &c.signs {
            grow(&mut self.planar.x, l.rows() * avx2::PX);
            grow(&mut self.planar.y, g.cout.div_ceil(8) * 8 * avx2::PX);
        }
        if matches!(c.signs, Signs::Lut { .. }) {
            grow(&mut self.lut, avx512::ROWS * (g.kh * g.kw * g.cin).div_ceil(avx512::LG) * 32);
        }
    }
}

/// Whether the AVX-512 kernels (`Layout::Bits`, `Layout::Lut(false)`) can run here.
pub fn avx512_available() -> bool {
    avx512::available()
}

/// Whether the AVX2 sign-apply kernels (`Layout::Sign`) can run here.
pub fn avx2_available() -> bool {
    avx2::available()
}

/// Whether the byte-permute lookup kernel (`Layout::Lut(true)`, AVX-512 VBMI) can run here.
pub fn vbmi_available() -> bool {
    avx512::vbmi()
}

/// The rows a pointwise kernel reads: 8-bit values already quantized (in `i16`), or `f32`
/// values with the factor `127 / max |x|` to quantize them with as they are read.
#[derive(Clone, Copy)]
pub(crate) enum Rows<'a> {
    I16(&'a [i16]),
    F32(&'a [f32], f32),
}

impl Rows<'_> {
    fn len(&self) -> usize {
        match self {
            Rows::I16(x) => x.len(),
            Rows::F32(x, _) => x.len(),
        }
    }
}

/// The affine a W1-A8 layer's output goes through: `y = act(scale[c] * (k * sum) + bias[c])`
/// with `k` the image's activation scale (the plan's `Stage::Affine`).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Epilogue<'a> {
    /// The image's activation scale.
    pub k: f32,
    /// Per-channel activation scales instead of `k` (depthwise layers).
    pub kc: Option<&'a [f32]>,
    /// Per-channel scale.
    pub scale: &'a [f32],
    /// Per-channel bias.
    pub bias: &'a [f32],
    /// Activation.
    pub act: Act,
}

/// Where an AVX-512 kernel writes: `y`, and with an epilogue the affine applied on the way
/// and each output channel's `max |y|` (NaN skipped) in `cmax`.
pub(crate) struct Out<'a> {
    y: &'a mut [f32],
    ep: Option<Epilogue<'a>>,
    cmax: &'a mut [f32],
}

impl<'a> Out<'a> {
    /// `cmax` (one per output channel, with an epilogue; may be empty without) is zeroed.
    fn new(y: &'a mut [f32], ep: Option<Epilogue<'a>>, cmax: &'a mut [f32]) -> Self {
        cmax.fill(0.0);
        Out { y, ep, cmax }
    }

    /// Room for `len` outputs of `c` channels (and an epilogue covering them).
    fn check(&self, len: usize, c: usize) {
        assert!(self.y.len() >= len);
        if let Some(e) = &self.ep {
            assert!(e.scale.len() >= c && e.bias.len() >= c && e.kc.is_none_or(|k| k.len() >= c));
            assert!(self.cmax.len() >= c);
        }
    }

    /// Fold a kernel's running `max |y|` register (never NaN) of channels `c0..` (lanes `m`)
    /// into `cmax`; nothing without an epilogue.
    #[cfg(target_arch = "x86_64")]
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn merge_max(&mut self, c0: usize, m: std::arch::x86_64::__mmask16, mx: std::arch::x86_64::__m512) {
        use std::arch::x86_64::*;
        if self.ep.is_some() {
            let p = self.cmax.as_mut_ptr().add(c0);
            _mm512_mask_storeu_ps(p, m, _mm512_max_ps(mx, _mm512_maskz_loadu_ps(m, p)));
        }
    }

    /// `max |y|` of everything written (0 when nothing was).
    fn max(&self) -> f32 {
        self.cmax.iter().fold(0.0f32, |m, &v| if v > m { v } else { m })
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
        Self::with_layout(g, w, Layout::Auto)
    }

    /// [`A8Conv::new`] with the sign layout chosen by the caller (tests cover every kernel
    /// with it). Panics if `layout` needs what the machine or the layer lacks.
    pub fn with_layout(g: ConvGeom, w: &[f32], layout: Layout) -> A8Conv {
        let zeros = w.contains(&0.0);
        let depthwise = g.groups > 1;
        let kind = if depthwise {
            A8Kind::Depthwise
        } else if g.kh == 1 && g.stride == 1 && g.pad == 0 {
            A8Kind::Pointwise
        } else {
            A8Kind::Dense
        };
        let wide512 = avx512::available();
        let layout = match layout {
            // The AVX2 pointwise kernel sums 16 pixels per register: images of fewer pixels
            // (mobilenet's 2x2 layers) run faster vectorized over the output channels.
            Layout::Auto
                if !wide512
                    && avx2::available()
                    && (depthwise || (kind == A8Kind::Pointwise && g.oh * g.ow >= avx2::MIN_PIXELS)) =>
            {
                Layout::Sign
            }
            Layout::Auto
                if wide512 && !depthwise && g.cout >= if zeros { LUT_MIN_COUT_ZEROS } else { LUT_MIN_COUT } =>
            {
                Layout::Lut(avx512::vbmi())
            }
            Layout::Auto if wide512 => Layout::Bits,
            Layout::Auto => Layout::Wide,
            l => {
                assert!(l != Layout::Sign || (avx2::available() && kind != A8Kind::Dense), "AVX2 kernels: no kxk");
                assert!(matches!(l, Layout::Wide | Layout::Sign) || wide512, "the AVX-512 kernels need AVX-512 BW");
                assert!(l != Layout::Lut(true) || avx512::vbmi(), "byte lookups need AVX-512 VBMI");
                assert!(!matches!(l, Layout::Lut(_)) || !depthwise, "the lookup kernel is for dense layers");
                l
            }
        };
        let signs = if let Layout::Lut(bytes) = layout {
            let kt = g.kh * g.kw * g.cin;
            let (ng, nblk) = (kt.div_ceil(avx512::LG), g.cout.div_ceil(32));
            // The `+1` indices, and after them (for a layer with zeros) the `-1` indices.
            let half = ng * nblk * 32;
            let mut ix = vec![0u16; if zeros { 2 * half } else { half }];
            for co in 0..g.cout {
                for k in 0..kt {
                    let (v, at) = (w[co * kt + k], ((k / avx512::LG) * nblk + co / 32) * 32 + co % 32);
                    if v > 0.0 {
                        ix[at] |= 1 << (k % avx512::LG);
                    } else if v < 0.0 && zeros {
                        ix[half + at] |= 1 << (k % avx512::LG);
                    }
                }
            }
            if bytes {
                // Little-endian lanes: low byte e (the entry's low byte), high byte e + 32.
                ix.iter_mut().for_each(|e| *e |= (*e + 32) << 8);
            }
            Signs::Lut { ix, bytes }
        } else if layout == Layout::Bits {
            // Depthwise: weights `[c][tap]`; dense: `[co][k]`.
            let kt = if depthwise { g.kh * g.kw } else { g.kh * g.kw * g.cin };
            let nblk = g.cout.div_ceil(32);
            let (mut mp, mut mn) = (vec![0u32; kt * nblk], vec![0u32; kt * nblk]);
            for co in 0..g.cout {
                for k in 0..kt {
                    let v = w[co * kt + k];
                    mp[k * nblk + co / 32] |= u32::from(v > 0.0) << (co % 32);
                    mn[k * nblk + co / 32] |= u32::from(v < 0.0) << (co % 32);
                }
            }
            Signs::Bits { mp, mn }
        } else if layout == Layout::Sign && !depthwise {
            Signs::List(avx2::Lists::new(g.cin, g.cout, w))
        } else if layout == Layout::Sign {
            let (taps, cpad) = (g.kh * g.kw, g.cin.div_ceil(16) * 16);
            let mut sw = vec![0i16; taps * cpad];
            for c in 0..g.cin {
                for t in 0..taps {
                    let v = w[c * taps + t];
                    sw[t * cpad + c] = if v > 0.0 {
                        1
                    } else if v < 0.0 {
                        -1
                    } else {
                        0
                    };
                }
            }
            Signs::Sign { w: sw }
        } else if depthwise {
            let taps = g.kh * g.kw;
            let (mut wp, mut wn) = (vec![0i16; taps * g.cin], vec![0i16; taps * g.cin]);
            for c in 0..g.cin {
                for t in 0..taps {
                    wp[t * g.cin + c] = mask(w[c * taps + t] > 0.0);
                    wn[t * g.cin + c] = mask(w[c * taps + t] < 0.0);
                }
            }
            Signs::Wide { wp, wn }
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
            Signs::Wide { wp, wn }
        };
        A8Conv { g, kind, signs, zeros }
    }

    /// Rows of `k` activations through the dense kernel: AVX-512 where planned, else the
    /// 16-bit AND-mask loops.
    fn rows(&self, x: Rows, k: usize, out: &mut Out, dup: &mut [i32], lut: &mut [i16], pl: &mut Planar) {
        match &self.signs {
            // SAFETY: lists are planned only where `avx2::available()`; `pl` was sized by
            // `QuantScratch::reserve` for this layer.
            Signs::List(l) => unsafe { avx2::pw_rows(x, k, self.g.cout, l, out, &mut pl.x, &mut pl.y) },
            // SAFETY: bit masks are planned only where `avx512::available()` (avx512f +
            // avx512bw); `dup` was sized by `QuantScratch::reserve` for this layer.
            Signs::Bits { mp, mn } => unsafe { avx512::pw_rows(x, k, self.g.cout, mp, mn, self.zeros, out, dup) },
            // SAFETY: as above; `lut` was sized by `QuantScratch::reserve` for this layer.
            Signs::Lut { ix, bytes: false } => unsafe { avx512::lut_rows(x, k, self.g.cout, ix, out, dup, lut) },
            // SAFETY: as above, and byte indices are planned only where `avx512::vbmi()`.
            Signs::Lut { ix, bytes: true } => unsafe { avx512::lut_rows_vbmi(x, k, self.g.cout, ix, out, dup, lut) },
            Signs::Sign { .. } => unreachable!("sign-apply layouts are planned for depthwise layers only"),
            Signs::Wide { wp, wn } => {
                assert!(out.ep.is_none(), "the portable kernels write raw sums");
                let Rows::I16(x) = x else { unreachable!("the portable kernels read quantized rows") };
                pw_rows(x, k, self.g.cout, wp, wn, self.zeros, out.y)
            }
        }
    }

    /// Whether [`A8Conv::forward_affine`] applies the affine inside the kernel (the AVX-512
    /// kernels); otherwise the caller runs [`A8Conv::forward_raw`] and an affine pass.
    pub fn fuses_affine(&self) -> bool {
        !matches!(self.signs, Signs::Wide { .. })
    }

    /// `y = act(scale[c] * (k_b * sum) + bias[c])` for `n` images, `k_b` image `b`'s
    /// activation scale, written by the kernel as it stores each sum; `s.known[b]` gets image
    /// `b`'s `max |y|` (NaN skipped, as the quantization finds it) for the next layer's quantization. The
    /// values equal [`A8Conv::forward_raw`] followed by that affine in `f32` (`k * sum`
    /// first, then `scale *`, then `+ bias`, no fused multiply-add). Only where
    /// [`A8Conv::fuses_affine`].
    #[allow(clippy::too_many_arguments)]
    pub fn forward_affine(
        &self,
        n: usize,
        x: &[f32],
        y: &mut [f32],
        s: &mut QuantScratch,
        known: bool,
        scale: &[f32],
        bias: &[f32],
        act: Act,
    ) {
        assert!(self.fuses_affine() && scale.len() >= self.g.cout && bias.len() >= self.g.cout);
        self.quantize(n, x, s, known);
        let ol = self.g.oh * self.g.ow * self.g.cout;
        // Out of the scratch while the kernel borrows it (moves, not copies).
        let cscale = std::mem::take(&mut s.cscale);
        let mut known_ch = std::mem::take(&mut s.known_ch);
        let c = self.g.cout;
        assert!(known_ch.len() >= n * c, "scratch not reserved for this layer");
        for ((b, yb), cmax) in y[..n * ol].chunks_exact_mut(ol).enumerate().zip(known_ch.chunks_exact_mut(c)) {
            let kc = self.depthwise().then(|| &cscale[b * self.g.cin..][..self.g.cin]);
            let ep = Epilogue { k: s.scale[b], kc, scale, bias, act };
            let mut out = Out::new(yb, Some(ep), cmax);
            self.image(b, x, &mut out, s);
            s.known[b] = out.max();
        }
        s.cscale = cscale;
        s.known_ch = known_ch;
        s.known_ch_valid = true;
    }

    /// Quantize `n` images of `x` into `s.q` and their scales into `s.scale`; a pointwise
    /// AVX-512 layer only finds the scales (`s.inv`), its kernel quantizes as it reads.
    fn quantize(&self, n: usize, x: &[f32], s: &mut QuantScratch, known: bool) {
        let il = self.g.h * self.g.w * self.g.cin;
        let pl = self.padded_len();
        let on_the_fly = self.kind == A8Kind::Pointwise && !matches!(self.signs, Signs::Wide { .. });
        for b in 0..n {
            let xb = &x[b * il..][..il];
            s.inv[b] = 0.0;
            if self.depthwise() {
                // One scale per channel: each output channel reads one input channel, so the
                // sums stay exact per channel, and a channel of small values keeps its
                // resolution beside one of large values (group-pruned models have both).
                s.scale[b] = 1.0;
                let c = self.g.cin;
                let (kc, inv) = (&mut s.cscale[b * c..][..c], &mut s.cinv[..c]);
                if known && s.known_ch_valid {
                    kc.copy_from_slice(&s.known_ch[b * c..][..c]);
                } else {
                    channel_abs_max_of(xb, kc);
                }
                channel_scales(kc, inv);
                if self.padded() {
                    quantize_padded(&self.g, xb, &mut s.qpad[b * pl..][..pl], inv);
                } else {
                    quantize_channels(xb, &mut s.q[b * il..][..il], inv);
                }
                continue;
            }
            let amax = if known { s.known[b] } else { abs_max_of(xb) };
            s.scale[b] = if on_the_fly && amax > 0.0 && amax.is_finite() {
                s.inv[b] = 127.0 / amax;
                amax / 127.0
            } else {
                quantize_with(xb, &mut s.q[b * il..][..il], amax)
            };
        }
    }

    /// Image `b` of the input (`x`, quantized in `s.q` or on the fly) through the layer's
    /// kernel into `out`.
    fn image(&self, b: usize, x: &[f32], out: &mut Out, s: &mut QuantScratch) {
        let g = ConvGeom { batch: 1, ..self.g };
        let il = g.h * g.w * g.cin;
        let xb = &s.q[b * il..][..il];
        match self.kind {
            A8Kind::Depthwise => match &self.signs {
                Signs::Bits { mp, mn } => {
                    let xp = &s.qpad[b * self.padded_len()..];
                    // SAFETY: bit masks are planned only where `avx512::available()`; `xp`
                    // is the image `quantize` wrote with its border, then the slack.
                    unsafe { avx512::dw_image(&g, xp, mp, mn, out) }
                }
                Signs::Sign { w } => {
                    let xp = &s.qpad[b * self.padded_len()..];
                    // SAFETY: sign layouts are planned only where `avx2::available()`; `xp`
                    // is the image `quantize` wrote with its border, then the slack.
                    unsafe { avx2::dw_image(&g, xp, w, out) }
                }
                Signs::Wide { wp, wn } => {
                    assert!(out.ep.is_none(), "the portable kernels write raw sums");
                    dw_image(&g, xb, wp, wn, out.y, &mut s.acc[..g.cin])
                }
                Signs::Lut { .. } | Signs::List(_) => {
                    unreachable!("depthwise layers are not planned with tables or lists")
                }
            },
            A8Kind::Pointwise => {
                let rows = if s.inv[b] > 0.0 { Rows::F32(&x[b * il..][..il], s.inv[b]) } else { Rows::I16(xb) };
                self.rows(rows, g.cin, out, &mut s.dup, &mut s.lut, &mut s.planar)
            }
            A8Kind::Dense => {
                let kt = g.kh * g.kw * g.cin;
                let rows = g.out_rows();
                im2col_i16(&g, xb, &mut s.col[..rows * kt]);
                self.rows(Rows::I16(&s.col[..rows * kt]), kt, out, &mut s.dup, &mut s.lut, &mut s.planar);
            }
        }
    }

    /// Whether the layer reads its input quantized into a zero border (the AVX-512 and
    /// AVX2 depthwise kernels).
    fn padded(&self) -> bool {
        self.kind == A8Kind::Depthwise && matches!(self.signs, Signs::Bits { .. } | Signs::Sign { .. })
    }

    /// Elements of one image quantized into its zero border.
    fn padded_len(&self) -> usize {
        let g = &self.g;
        (g.h + 2 * g.pad) * (g.w + 2 * g.pad) * g.cin
    }

    /// Whether the layer runs the lookup-table kernel.
    pub fn lookup(&self) -> bool {
        matches!(self.signs, Signs::Lut { .. })
    }

    /// For a lookup layer, per image: the table lookups (one per output channel, group of 5
    /// inputs and sign set: `+1`, and `-1` where the layer has zeros) and the 16-bit
    /// additions executed (building each table: 16 lanes per input of the group; then one
    /// addition or subtraction per lookup). `None` for the other kernels, whose additions are
    /// their multiply-accumulates.
    pub fn lookup_counts(&self) -> Option<(u64, u64)> {
        let Signs::Lut { ix, .. } = &self.signs else { return None };
        let g = &self.g;
        let kt = g.kh * g.kw * g.cin;
        let (ng, nblk) = (kt.div_ceil(avx512::LG), g.cout.div_ceil(32));
        let sets = (ix.len() / (ng * nblk * 32)) as u64;
        let pixels = (g.oh * g.ow) as u64;
        let lookups = pixels * (ng * g.cout) as u64 * sets;
        Some((lookups, pixels * 16 * kt as u64 + lookups))
    }

    /// Whether this is a depthwise layer.
    pub fn depthwise(&self) -> bool {
        self.kind == A8Kind::Depthwise
    }

    /// `y = conv(x)` for `n` images of `f32` input, through 8-bit activations: `y` (NHWC,
    /// `n * oh * ow * cout`) gets `scale_image * integer sum`. `known` as for
    /// [`A8Conv::forward_raw`].
    pub fn forward(&self, n: usize, x: &[f32], y: &mut [f32], s: &mut QuantScratch, known: bool) {
        self.forward_raw(n, x, y, s, known);
        let ol = self.g.oh * self.g.ow * self.g.cout;
        for (b, yb) in y[..n * ol].chunks_exact_mut(ol).enumerate() {
            scale_in_place(yb, s.scale[b]);
        }
    }

    /// As [`A8Conv::forward`] without the last multiplication: `y` gets the integer sums
    /// (as `f32`, exact below 2^24) and `s.image_scale(b)` each image's scale; for a
    /// depthwise layer `y` gets the sums times their per-channel scales and the image scale
    /// is 1 (and the per-channel maxima `known_ch` are marked stale either way).
    /// With `known`, `s.known[b]` is taken as image `b`'s `max |x|` (NaN skipped, as the quantization finds it)
    /// instead of a pass over `x`.
    pub fn forward_raw(&self, n: usize, x: &[f32], y: &mut [f32], s: &mut QuantScratch, known: bool) {
        self.quantize(n, x, s, known);
        s.known_ch_valid = false;
        let ol = self.g.oh * self.g.ow * self.g.cout;
        for (b, yb) in y[..n * ol].chunks_exact_mut(ol).enumerate() {
            self.image(b, x, &mut Out::new(yb, None, &mut []), s);
            if self.depthwise() {
                // The per-channel scales here (the image scale is 1): the same product the
                // fused affine forms first.
                let c = self.g.cout;
                scale_channels(yb, &s.cscale[b * c..][..c]);
            }
        }
    }
}

sbdnet_kernels::simd_kernel! {
    /// `y *= s`.
    fn scale_in_place(y: &mut [f32], s: f32) {
        for v in y.iter_mut() {
            *v *= s;
        }
    }
}

sbdnet_kernels::simd_kernel! {
    /// `y[p][c] = k[c] * y[p][c]` over pixels of `k.len()` channels.
    fn scale_channels(y: &mut [f32], k: &[f32]) {
        for row in y.chunks_exact_mut(k.len()) {
            for (v, &s) in row.iter_mut().zip(k) {
                *v *= s;
            }
        }
    }
}

sbdnet_kernels::simd_kernel! {
    /// `out[c] = max |x[p][c]|` over the pixels of `out.len()` channels (NaN skipped).
    fn channel_abs_max(x: &[f32], out: &mut [f32]) {
        out.fill(0.0);
        for row in x.chunks_exact(out.len()) {
            for (m, &v) in out.iter_mut().zip(row) {
                let a = v.abs();
                // A compare-select (not f32::max) so it vectorizes; NaN is skipped.
                *m = if a > *m { a } else { *m };
            }
        }
    }
}

/// [`channel_abs_max`] of one `pixels x kc.len()` image into `kc`.
fn channel_abs_max_of(x: &[f32], kc: &mut [f32]) {
    if avx512::available() {
        // SAFETY: `avx512::available` checked AVX-512 F, BW and VL.
        unsafe { avx512::channel_abs_max(x, kc) }
    } else if avx2::available() {
        // SAFETY: `avx2::available` checked AVX2 and FMA.
        unsafe { avx2::channel_abs_max(x, kc) }
    } else {
        channel_abs_max(x, kc);
    }
}

/// Per-channel scales from the maxima in `kc` (`max_c |x|`, replaced by `max_c |x| / 127`)
/// and `inv[c] = 127 / max_c |x|`; a channel whose max is 0 or not finite gets `kc = 1`, `inv = 0` (and
/// quantizes to zeros, as a whole tensor does in [`quantize_with`]).
fn channel_scales(kc: &mut [f32], inv: &mut [f32]) {
    for (k, i) in kc.iter_mut().zip(inv.iter_mut()) {
        // A max so small that 127 / max overflows counts as zero, like a zero max.
        (*k, *i) =
            if *k > 0.0 && k.is_finite() && (127.0 / *k).is_finite() { (*k / 127.0, 127.0 / *k) } else { (1.0, 0.0) };
    }
}

/// Quantize pixels of `inv.len()` channels with one inverse scale per channel (rounding and
/// clamping as [`quantize_into`]); channels whose `inv` is 0 become zeros (selected, since a
/// NaN or infinite input times 0 is not 0).
fn quantize_channels(x: &[f32], q: &mut [i16], inv: &[f32]) {
    if avx512::available() {
        // SAFETY: `avx512::available` checked AVX-512 F, BW and VL.
        unsafe { avx512::quantize_channels(x, q, inv) }
    } else if avx2::available() {
        // SAFETY: `avx2::available` checked AVX2 and FMA.
        unsafe { avx2::quantize_channels(x, q, inv) }
    } else {
        quantize_channels_portable(x, q, inv);
    }
}

sbdnet_kernels::simd_kernel! {
    fn quantize_channels_portable(x: &[f32], q: &mut [i16], inv: &[f32]) {
        for (qr, xr) in q.chunks_exact_mut(inv.len()).zip(x.chunks_exact(inv.len())) {
            for ((q, &v), &s) in qr.iter_mut().zip(xr).zip(inv) {
                let y = quantize_one(v, s);
                *q = if s == 0.0 { 0 } else { y };
            }
        }
    }
}

/// A running `max |x|` with NaN skipped: eight lanes (so it vectorizes) and a scalar for
/// the tails; [`AbsMax::add`] any number of slices, then [`AbsMax::get`].
#[derive(Clone, Copy, Default)]
pub(crate) struct AbsMax {
    lanes: [f32; 8],
    rest: f32,
}

impl AbsMax {
    #[inline(always)]
    pub(crate) fn add(&mut self, x: &[f32]) {
        let mut chunks = x.chunks_exact(8);
        for c in &mut chunks {
            for (l, &v) in self.lanes.iter_mut().zip(c) {
                let a = v.abs();
                // A compare-select (not f32::max) so it compiles to vmaxps; NaN is skipped.
                *l = if a > *l { a } else { *l };
            }
        }
        for &v in chunks.remainder() {
            self.rest = self.rest.max(v.abs());
        }
    }

    #[inline(always)]
    pub(crate) fn get(&self) -> f32 {
        self.lanes.iter().fold(self.rest, |a, &b| a.max(b))
    }
}

sbdnet_kernels::simd_kernel! {
    /// `max |x|` into `out[0]` (NaN skipped).
    pub(crate) fn abs_max(x: &[f32], out: &mut [f32]) {
        let mut m = AbsMax::default();
        m.add(x);
        out[0] = m.get();
    }
}

/// [`quantize_channels`] of one `h x w x cin` image of `g` into a `(h + 2 pad) x (w + 2 pad)
/// x cin` buffer whose border it sets to zero.
fn quantize_padded(g: &ConvGeom, x: &[f32], q: &mut [i16], inv: &[f32]) {
    let (row, side) = (g.w * g.cin, g.pad * g.cin);
    let rl = row + 2 * side;
    q[..g.pad * rl].fill(0);
    q[(g.pad + g.h) * rl..][..g.pad * rl].fill(0);
    for y in 0..g.h {
        let r = &mut q[(g.pad + y) * rl..][..rl];
        r[..side].fill(0);
        r[side + row..].fill(0);
        quantize_channels(&x[y * row..][..row], &mut r[side..][..row], inv);
    }
}

/// `max |x|`, NaN skipped (as [`abs_max`]).
fn abs_max_of(x: &[f32]) -> f32 {
    let mut amax = [0.0f32];
    abs_max(x, &mut amax);
    amax[0]
}

/// Quantize to `|q| <= 127` with one scale from `max |x|` (`amax`, NaN skipped); returns the
/// scale (`x ~ q * scale`; 1 with every `q` zero when `amax` is 0 or not finite).
fn quantize_with(x: &[f32], q: &mut [i16], amax: f32) -> f32 {
    if !(amax > 0.0 && amax.is_finite()) {
        q.fill(0);
        return 1.0;
    }
    let inv = 127.0 / amax;
    if avx512::available() {
        // SAFETY: the CPU has AVX-512 F and BW.
        unsafe { avx512::quantize_into(x, q, inv) }
    } else if avx2::available() {
        // SAFETY: `avx2::available` checked AVX2 and FMA.
        unsafe { avx2::quantize_into(x, q, inv) }
    } else {
        quantize_into(x, q, inv);
    }
    amax / 127.0
}

sbdnet_kernels::simd_kernel! {
    fn quantize_into(x: &[f32], q: &mut [i16], inv: f32) {
        for (q, &v) in q.iter_mut().zip(x) {
            *q = quantize_one(v, inv);
        }
    }
}

/// `round(v * inv)` clamped to `+-127`, NaN to -127: the scalar rule every quantization
/// path follows.
#[inline(always)]
fn quantize_one(v: f32, inv: f32) -> i16 {
    let y = (v * inv).round_ties_even();
    // Clamp with compare-selects: NaN becomes -127, so the value is finite and in range for
    // the unchecked conversion (which, unlike `as`, vectorizes).
    let y = if y > -127.0 { y } else { -127.0 };
    let y = if y < 127.0 { y } else { 127.0 };
    // SAFETY: `y` is finite and within [-127, 127].
    unsafe { y.to_int_unchecked::<i32>() as i16 }
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

/// The dense W1-A8 kernel on AVX-512: output channels in 16-bit lanes (32 per register),
/// each input value broadcast to all lanes and added under the `k` mask of the channels whose
/// weight is `+1` (`vpaddw` with a mask: one instruction per 32 additions, no AND), and
/// subtracted under the `-1` mask where the layer has zeros. Tiles of 4 pixels x 4 registers
/// (128 channels) stay in registers over runs of 256 inputs (`256 * 127 < 2^15`, no overflow),
/// then widen into 32-bit sums. Integer sums identical to [`pw_rows`].
mod avx512 {
    use super::{Out, Rows};
    #[cfg(target_arch = "x86_64")]
    use sbdnet_kernels::lanes16;
    #[cfg(target_arch = "x86_64")]
    use std::arch::x86_64::*;

    /// Pixels per tile.
    pub const ROWS: usize = 4;
    /// Registers of 32 channels per tile.
    const NV: usize = 4;
    /// Inputs per 16-bit run.
    const RUN: usize = 256;
    /// Inputs per lookup table (32 entries: one register of 16-bit lanes).
    pub const LG: usize = 5;
    /// Tables per 16-bit run of the lookup kernel: `51 * 5 * 127 < 2^15`.
    const LRUN: usize = 51;

    /// Whether the kernels can run (AVX-512 F + BW + VL, no forced fallback).
    pub fn available() -> bool {
        #[cfg(target_arch = "x86_64")]
        {
            sbdnet_kernels::kernel_path() == sbdnet_kernels::KernelPath::Avx2
                && is_x86_feature_detected!("avx512f")
                && is_x86_feature_detected!("avx512bw")
                && is_x86_feature_detected!("avx512vl")
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            false
        }
    }

    /// `y[r][co] = sum_k sign(w[co][k]) * x[r][k]` as `f32`, masks `[k][cout / 32]`; `dup`
    /// holds at least `ROWS * k` words.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn pw_rows(
        x: Rows,
        k: usize,
        cout: usize,
        mp: &[u32],
        mn: &[u32],
        zeros: bool,
        out: &mut Out,
        dup: &mut [i32],
    ) {
        let nblk = cout.div_ceil(32);
        assert!(mp.len() >= k * nblk && mn.len() >= k * nblk && dup.len() >= ROWS * k);
        let rows = x.len() / k;
        out.check(rows * cout, cout);
        let mut r = 0;
        while r < rows {
            let np = ROWS.min(rows - r);
            let sums = duplicate(x, k, r, np, dup);
            let mut b0 = 0;
            while b0 < nblk {
                let nv = NV.min(nblk - b0);
                match (nv, zeros) {
                    (4, false) => tile::<4, false>(dup, k, mp, mn, nblk, b0, &sums, np, cout, out, r),
                    (4, true) => tile::<4, true>(dup, k, mp, mn, nblk, b0, &sums, np, cout, out, r),
                    (3, false) => tile::<3, false>(dup, k, mp, mn, nblk, b0, &sums, np, cout, out, r),
                    (3, true) => tile::<3, true>(dup, k, mp, mn, nblk, b0, &sums, np, cout, out, r),
                    (2, false) => tile::<2, false>(dup, k, mp, mn, nblk, b0, &sums, np, cout, out, r),
                    (2, true) => tile::<2, true>(dup, k, mp, mn, nblk, b0, &sums, np, cout, out, r),
                    (_, false) => tile::<1, false>(dup, k, mp, mn, nblk, b0, &sums, np, cout, out, r),
                    (_, true) => tile::<1, true>(dup, k, mp, mn, nblk, b0, &sums, np, cout, out, r),
                }
                b0 += nv;
            }
            r += np;
        }
    }

    /// A masked 16-bit instruction `ins a{k}, a, x` as a function. The intrinsics
    /// (`_mm512_mask_add_epi16` ...) are rewritten by the compiler where `x` is used twice (a
    /// zero-masked move of `x` and an unmasked add: two vector instructions) or is a
    /// broadcast (an AND with the mask as a constant, then the add), so the hot loops state
    /// the instruction.
    macro_rules! masked_w {
        ($(#[$doc:meta])* $name:ident, $ins:literal) => {
            $(#[$doc])*
            #[cfg(target_arch = "x86_64")]
            #[inline]
            #[target_feature(enable = "avx512f,avx512bw")]
            unsafe fn $name(a: __m512i, k: __mmask32, x: __m512i) -> __m512i {
                let mut a = a;
                // SAFETY: a register-only instruction of AVX-512 BW, which this function requires.
                unsafe {
                    std::arch::asm!(
                        concat!($ins, " {a}{{{k}}}, {a}, {x}"),
                        a = inout(zmm_reg) a,
                        k = in(kreg) k,
                        x = in(zmm_reg) x,
                        options(pure, nomem, nostack, preserves_flags)
                    );
                }
                a
            }
        };
    }

    masked_w!(
        /// `a + x` in the 16-bit lanes `k` selects, `a` elsewhere: one masked `vpaddw`.
        add_w,
        "vpaddw"
    );
    masked_w!(
        /// `a - x` in the 16-bit lanes `k` selects, `a` elsewhere: one masked `vpsubw`.
        sub_w,
        "vpsubw"
    );

    /// Whether the lookup kernel can use byte permutes (AVX-512 VBMI).
    pub fn vbmi() -> bool {
        #[cfg(target_arch = "x86_64")]
        {
            available() && is_x86_feature_detected!("avx512vbmi")
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            false
        }
    }

    /// [`super::quantize_into`] (the same values: round half to even, NaN to -127) 16 lanes
    /// at a time.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    pub unsafe fn quantize_into(x: &[f32], q: &mut [i16], inv: f32) {
        let n = x.len().min(q.len());
        let mut i = 0;
        // 32 at a time: the two halves' 32-bit values packed to 16 bits with saturation (in
        // range already: clamped to +-127) by one `vpackssdw`, whose per-128-bit interleave
        // one `vpermq` undoes; two instructions per 32 values instead of four.
        let order = _mm512_set_epi64(7, 5, 3, 1, 6, 4, 2, 0);
        while i + 32 <= n {
            let a = quantize16(0xFFFF, x.as_ptr().add(i), inv);
            let b = quantize16(0xFFFF, x.as_ptr().add(i + 16), inv);
            let v = _mm512_permutexvar_epi64(order, _mm512_packs_epi32(a, b));
            _mm512_storeu_si512(q.as_mut_ptr().add(i).cast(), v);
            i += 32;
        }
        while i < n {
            let m = lanes16(n - i);
            let r = quantize16(m, x.as_ptr().add(i), inv);
            _mm256_mask_storeu_epi16(q.as_mut_ptr().add(i).cast(), m, _mm512_cvtepi32_epi16(r));
            i += 16;
        }
    }

    /// Channels per register-resident block of the per-channel passes (8 registers).
    const CH_BLOCK: usize = 128;

    /// The lane masks and (masked) `src` values of the 16-channel pieces of channels
    /// `c0..c0 + CH_BLOCK` (of `c`), and how many pieces there are.
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn pieces(src: &[f32], c0: usize) -> (usize, [__mmask16; 8], [__m512; 8]) {
        let c = src.len();
        let n = (c - c0).min(CH_BLOCK).div_ceil(16);
        let m: [__mmask16; 8] = std::array::from_fn(|j| if j < n { lanes16(c - c0 - 16 * j) } else { 0 });
        let v = std::array::from_fn(|j| _mm512_maskz_loadu_ps(m[j], src.as_ptr().wrapping_add(c0 + 16 * j)));
        (n, m, v)
    }

    /// [`super::channel_abs_max`] (the same values) with each block of 128 channels' maxima
    /// in registers over all pixels.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    pub unsafe fn channel_abs_max(x: &[f32], out: &mut [f32]) {
        let c = out.len();
        let px = x.len() / c;
        out.fill(0.0);
        for c0 in (0..c).step_by(CH_BLOCK) {
            let (n, m, mut acc) = pieces(out, c0);
            for p in 0..px {
                let row = x.as_ptr().add(p * c + c0);
                for j in 0..n {
                    // `max_ps(v, acc)` keeps `acc` for a NaN `v`: NaN is skipped.
                    let v = _mm512_abs_ps(_mm512_maskz_loadu_ps(m[j], row.add(16 * j)));
                    acc[j] = _mm512_max_ps(v, acc[j]);
                }
            }
            for j in 0..n {
                _mm512_mask_storeu_ps(out.as_mut_ptr().add(c0 + 16 * j), m[j], acc[j]);
            }
        }
    }

    /// [`super::quantize_channels_portable`] (the same values) with each block of 128
    /// channels' scales in registers over all pixels.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    pub unsafe fn quantize_channels(x: &[f32], q: &mut [i16], inv: &[f32]) {
        let c = inv.len();
        let px = x.len().min(q.len()) / c;
        for c0 in (0..c).step_by(CH_BLOCK) {
            let (n, m, s) = pieces(inv, c0);
            // Zero-scale channels give 0 whatever the input.
            let live: [__mmask16; 8] =
                std::array::from_fn(|j| _mm512_mask_cmpneq_ps_mask(m[j], s[j], _mm512_setzero_ps()));
            for p in 0..px {
                let at = p * c + c0;
                for j in 0..n {
                    let r = _mm512_maskz_mov_epi32(live[j], quantize16v(m[j], x.as_ptr().add(at + 16 * j), s[j]));
                    _mm256_mask_storeu_epi16(q.as_mut_ptr().add(at + 16 * j).cast(), m[j], _mm512_cvtepi32_epi16(r));
                }
            }
        }
    }

    #[cfg(not(target_arch = "x86_64"))]
    pub unsafe fn channel_abs_max(_: &[f32], _: &mut [f32]) {
        unreachable!("AVX-512 is x86_64 only")
    }

    #[cfg(not(target_arch = "x86_64"))]
    pub unsafe fn quantize_channels(_: &[f32], _: &mut [i16], _: &[f32]) {
        unreachable!("AVX-512 is x86_64 only")
    }

    /// Lanes `m` of the 16 values at `x` quantized as [`super::quantize_into`] does, in 32-bit
    /// lanes (0 elsewhere).
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn quantize16(m: __mmask16, x: *const f32, inv: f32) -> __m512i {
        quantize16v(m, x, _mm512_set1_ps(inv))
    }

    /// [`quantize16`] with an inverse scale per lane.
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn quantize16v(m: __mmask16, x: *const f32, inv: __m512) -> __m512i {
        let v = _mm512_mul_ps(_mm512_maskz_loadu_ps(m, x), inv);
        // max(v, -127) gives -127 for NaN (its second operand), as the scalar clamp does.
        let v = _mm512_min_ps(_mm512_max_ps(v, _mm512_set1_ps(-127.0)), _mm512_set1_ps(127.0));
        let r = _mm512_cvt_roundps_epi32::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(v);
        // Lanes past the data are cleared (with a subnormal `max |x|`, `inv` is infinite and
        // their `0 * inv` would become -127); a full vector has none.
        if m == 0xFFFF {
            r
        } else {
            _mm512_maskz_mov_epi32(m, r)
        }
    }

    #[cfg(not(target_arch = "x86_64"))]
    pub unsafe fn quantize_into(_: &[f32], _: &mut [i16], _: f32) {
        unreachable!("AVX-512 is x86_64 only")
    }

    /// Pixels `r..r + np` of `x` (rows of `k`, quantized as they are read when `f32`) into
    /// `dup` as 32-bit words holding each 8-bit value twice (pixel `np - 1` repeated up to
    /// `ROWS`); returns each pixel's sum.
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn duplicate(x: Rows, k: usize, r: usize, np: usize, dup: &mut [i32]) -> [i32; ROWS] {
        let mut sums = [0i32; ROWS];
        for (p, s) in sums.iter_mut().enumerate() {
            let start = (r + p.min(np - 1)) * k;
            let dst = &mut dup[p * k..][..k];
            let mut acc = _mm512_setzero_si512();
            let mut i = 0;
            while i < k {
                let m = lanes16(k - i);
                let v = match x {
                    Rows::I16(q) => {
                        let src = &q[start..][..k];
                        _mm512_cvtepi16_epi32(_mm256_maskz_loadu_epi16(m, src.as_ptr().add(i).cast()))
                    }
                    Rows::F32(f, inv) => quantize16(m, f[start..][..k].as_ptr().add(i), inv),
                };
                acc = _mm512_add_epi32(acc, v);
                // The 16-bit value in both halves of the word.
                let lo = _mm512_and_si512(v, _mm512_set1_epi32(0xFFFF));
                _mm512_mask_storeu_epi32(
                    dst.as_mut_ptr().add(i).cast(),
                    m,
                    _mm512_or_si512(lo, _mm512_slli_epi32::<16>(lo)),
                );
                i += 16;
            }
            *s = _mm512_reduce_add_epi32(acc);
        }
        sums
    }

    /// The lookup kernel: `y[r][co] = sum_k sign(w[co][k]) * x[r][k]` as `f32` for a layer
    /// without zeros, 16-bit indices `ix` as [`super::Signs::Lut`]; `dup` holds at least
    /// `ROWS * k` words and `lut` `ROWS * ceil(k / LG) * 32` entries.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    pub unsafe fn lut_rows(
        x: Rows,
        k: usize,
        cout: usize,
        ix: &[u16],
        out: &mut Out,
        dup: &mut [i32],
        lut: &mut [i16],
    ) {
        lut_rows_impl::<false>(x, k, cout, ix, out, dup, lut)
    }

    /// [`lut_rows`] with byte indices and byte permutes (AVX-512 VBMI).
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vbmi")]
    pub unsafe fn lut_rows_vbmi(
        x: Rows,
        k: usize,
        cout: usize,
        ix: &[u16],
        out: &mut Out,
        dup: &mut [i32],
        lut: &mut [i16],
    ) {
        lut_rows_impl::<true>(x, k, cout, ix, out, dup, lut)
    }

    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn lut_rows_impl<const B: bool>(
        x: Rows,
        k: usize,
        cout: usize,
        ix: &[u16],
        out: &mut Out,
        dup: &mut [i32],
        lut: &mut [i16],
    ) {
        let (nblk, ng) = (cout.div_ceil(32), k.div_ceil(LG));
        // A second set of indices (the `-1` weights) where the layer has zeros.
        let zeros = ix.len() == 2 * ng * nblk * 32;
        assert!(ix.len() == ng * nblk * 32 || zeros);
        assert!(dup.len() >= ROWS * k && lut.len() >= ROWS * ng * 32);
        let rows = x.len() / k;
        out.check(rows * cout, cout);
        // Lanes of table entry e that include input i of the group: bit i of e.
        const SEL: [u32; LG] = [0xAAAA_AAAA, 0xCCCC_CCCC, 0xF0F0_F0F0, 0xFF00_FF00, 0xFFFF_0000];
        let mut r = 0;
        while r < rows {
            let np = ROWS.min(rows - r);
            let sums = duplicate(x, k, r, np, dup);
            for p in 0..ROWS {
                for j in 0..ng {
                    let x = dup.as_ptr().add(p * k + j * LG);
                    let mut t = _mm512_setzero_si512();
                    if k - j * LG >= LG {
                        // A full group: five masked adds of broadcasts, no branches.
                        for (i, &sel) in SEL.iter().enumerate() {
                            t = add_w(t, sel, _mm512_set1_epi32(*x.add(i)));
                        }
                    } else {
                        for (i, &sel) in SEL.iter().enumerate().take(k - j * LG) {
                            t = add_w(t, sel, _mm512_set1_epi32(*x.add(i)));
                        }
                    }
                    if B {
                        // Low bytes of the 32 entries, then their high bytes.
                        let split = _mm512_set_epi8(
                            63, 61, 59, 57, 55, 53, 51, 49, 47, 45, 43, 41, 39, 37, 35, 33, 31, 29, 27, 25, 23, 21, 19,
                            17, 15, 13, 11, 9, 7, 5, 3, 1, 62, 60, 58, 56, 54, 52, 50, 48, 46, 44, 42, 40, 38, 36, 34,
                            32, 30, 28, 26, 24, 22, 20, 18, 16, 14, 12, 10, 8, 6, 4, 2, 0,
                        );
                        t = _mm512_permutexvar_epi8(split, t);
                    }
                    _mm512_storeu_si512(lut.as_mut_ptr().add((p * ng + j) * 32).cast(), t);
                }
            }
            let mut b0 = 0;
            while b0 < nblk {
                let nv = NV.min(nblk - b0);
                match (nv, zeros) {
                    (4, false) => lut_tile::<4, B, false>(lut, ng, ix, nblk, b0, &sums, np, cout, out, r),
                    (3, false) => lut_tile::<3, B, false>(lut, ng, ix, nblk, b0, &sums, np, cout, out, r),
                    (2, false) => lut_tile::<2, B, false>(lut, ng, ix, nblk, b0, &sums, np, cout, out, r),
                    (_, false) => lut_tile::<1, B, false>(lut, ng, ix, nblk, b0, &sums, np, cout, out, r),
                    (4, true) => lut_tile::<4, B, true>(lut, ng, ix, nblk, b0, &sums, np, cout, out, r),
                    (3, true) => lut_tile::<3, B, true>(lut, ng, ix, nblk, b0, &sums, np, cout, out, r),
                    (2, true) => lut_tile::<2, B, true>(lut, ng, ix, nblk, b0, &sums, np, cout, out, r),
                    (_, true) => lut_tile::<1, B, true>(lut, ng, ix, nblk, b0, &sums, np, cout, out, r),
                }
                b0 += nv;
            }
            r += np;
        }
    }

    /// Blocks `b0..b0 + V` of 32 channels for the `np` pixels whose tables are in `lut`
    /// (with `ZEROS`, minus the entries the `-1` indices select).
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    #[allow(clippy::too_many_arguments, clippy::needless_range_loop)]
    unsafe fn lut_tile<const V: usize, const B: bool, const ZEROS: bool>(
        lut: &[i16],
        ng: usize,
        ix: &[u16],
        nblk: usize,
        b0: usize,
        sums: &[i32; ROWS],
        np: usize,
        cout: usize,
        out: &mut Out,
        r: usize,
    ) {
        let mut wide = [[[_mm512_setzero_si512(); 2]; V]; ROWS];
        let (tp, ip) = (lut.as_ptr(), ix.as_ptr());
        let half = ng * nblk * 32;
        let mut j0 = 0;
        while j0 < ng {
            let j1 = (j0 + LRUN).min(ng);
            let mut acc = [[_mm512_setzero_si512(); V]; ROWS];
            for j in j0..j1 {
                let t: [__m512i; ROWS] = std::array::from_fn(|p| _mm512_loadu_si512(tp.add((p * ng + j) * 32).cast()));
                for v in 0..V {
                    let at = (j * nblk + b0 + v) * 32;
                    let idx = _mm512_loadu_si512(ip.add(at).cast());
                    for p in 0..ROWS {
                        acc[p][v] = _mm512_add_epi16(acc[p][v], look::<B>(idx, t[p]));
                    }
                    if ZEROS {
                        let idx = _mm512_loadu_si512(ip.add(half + at).cast());
                        for p in 0..ROWS {
                            acc[p][v] = _mm512_sub_epi16(acc[p][v], look::<B>(idx, t[p]));
                        }
                    }
                }
            }
            widen(&mut wide, &acc);
            j0 = j1;
        }
        store::<V>(&wide, ZEROS, sums, np, b0, cout, out, r);
    }

    /// The table entries `idx` selects: byte permute (`B`, VBMI) or 16-bit permute.
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn look<const B: bool>(idx: __m512i, t: __m512i) -> __m512i {
        if B {
            _mm512_permutexvar_epi8(idx, t)
        } else {
            _mm512_permutexvar_epi16(idx, t)
        }
    }

    /// Add 16-bit accumulators into their 32-bit sums.
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn widen<const V: usize>(wide: &mut [[[__m512i; 2]; V]; ROWS], acc: &[[__m512i; V]; ROWS]) {
        for (wp, ap) in wide.iter_mut().zip(acc) {
            for (w, &a) in wp.iter_mut().zip(ap) {
                w[0] = _mm512_add_epi32(w[0], _mm512_cvtepi16_epi32(_mm512_castsi512_si256(a)));
                w[1] = _mm512_add_epi32(w[1], _mm512_cvtepi16_epi32(_mm512_extracti64x4_epi64::<1>(a)));
            }
        }
    }

    /// Scale and bias of the 16 channels from `ch` (lanes `m`) for [`emit`], loaded once per
    /// block of channels (zeros without an epilogue).
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn affine16(out: &Out, ch: usize, m: __mmask16) -> [__m512; 3] {
        match &out.ep {
            None => [_mm512_setzero_ps(); 3],
            Some(e) => [
                _mm512_maskz_loadu_ps(m, e.scale.as_ptr().wrapping_add(ch)),
                _mm512_maskz_loadu_ps(m, e.bias.as_ptr().wrapping_add(ch)),
                match e.kc {
                    Some(k) => _mm512_maskz_loadu_ps(m, k.as_ptr().wrapping_add(ch)),
                    None => _mm512_set1_ps(e.k),
                },
            ],
        }
    }

    /// Write 16 integer sums (lanes `m`) at `y[at..]` (channels whose `affine16` is `sb`): as `f32`, or
    /// through the epilogue (the same operations in the same order as the plan's affine pass)
    /// with the running `max |y|` in `mx` updated (a register of the caller: kept in `out`,
    /// every emit would wait for the previous one's store; [`Out::merge_max`] once per call).
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn emit(out: &mut Out, mx: &mut __m512, at: usize, sb: [__m512; 3], m: __mmask16, sum: __m512i) {
        let v = _mm512_cvtepi32_ps(sum);
        let v = match &out.ep {
            None => v,
            Some(e) => {
                let [s, b, k] = sb;
                let t = _mm512_add_ps(_mm512_mul_ps(s, _mm512_mul_ps(k, v)), b);
                // NaN -> 0 (ReLU), -1 (hardtanh), as `f32::max` / `Act::apply` (see `act512`).
                let t = sbdnet_kernels::act512(t, e.act as u8);
                // A NaN |t| leaves the running max (max_ps returns its second operand).
                *mx = _mm512_mask_max_ps(*mx, m, _mm512_abs_ps(t), *mx);
                t
            }
        };
        _mm512_mask_storeu_ps(out.y.as_mut_ptr().add(at), m, v);
    }

    /// Store a tile's 32-bit sums of pixels `r..r + np` (channels past `cout` left out);
    /// without zeros the sums are `sum_{w=+1} x` and become `2 * sum - sum x`.
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    #[allow(clippy::too_many_arguments, clippy::needless_range_loop)]
    unsafe fn store<const V: usize>(
        wide: &[[[__m512i; 2]; V]; ROWS],
        zeros: bool,
        sums: &[i32; ROWS],
        np: usize,
        b0: usize,
        cout: usize,
        out: &mut Out,
        r: usize,
    ) {
        // Channels outer, so each 16 channels' scale and bias are loaded once for all pixels,
        // and their running max merged into the per-channel maxima once per tile.
        for v in 0..V {
            for h in 0..2 {
                let c0 = (b0 + v) * 32 + 16 * h;
                if c0 >= cout {
                    continue;
                }
                let m = lanes16(cout - c0);
                let sb = affine16(out, c0, m);
                let mut mx = _mm512_setzero_ps();
                for (p, &s) in sums.iter().enumerate().take(np) {
                    let w = wide[p][v][h];
                    // No zeros: sum_{+} x - sum_{-} x = 2 * sum_{+} x - sum x.
                    let w = if zeros { w } else { _mm512_sub_epi32(_mm512_slli_epi32::<1>(w), _mm512_set1_epi32(s)) };
                    emit(out, &mut mx, (r + p) * cout + c0, sb, m, w);
                }
                out.merge_max(c0, m, mx);
            }
        }
    }

    /// Blocks `b0..b0 + V` of 32 channels for the `np` pixels in `dup`.
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    #[allow(clippy::too_many_arguments, clippy::needless_range_loop)]
    unsafe fn tile<const V: usize, const ZEROS: bool>(
        dup: &[i32],
        k: usize,
        mp: &[u32],
        mn: &[u32],
        nblk: usize,
        b0: usize,
        sums: &[i32; ROWS],
        np: usize,
        cout: usize,
        out: &mut Out,
        r: usize,
    ) {
        let mut wide = [[[_mm512_setzero_si512(); 2]; V]; ROWS];
        let (dp, pp, np_) = (dup.as_ptr(), mp.as_ptr(), mn.as_ptr());
        let mut k0 = 0;
        while k0 < k {
            let k1 = (k0 + RUN).min(k);
            let mut acc = [[_mm512_setzero_si512(); V]; ROWS];
            for kk in k0..k1 {
                let xb: [__m512i; ROWS] = std::array::from_fn(|p| _mm512_set1_epi32(*dp.add(p * k + kk)));
                for v in 0..V {
                    let m = *pp.add(kk * nblk + b0 + v);
                    for p in 0..ROWS {
                        acc[p][v] = _mm512_mask_add_epi16(acc[p][v], m, acc[p][v], xb[p]);
                    }
                    if ZEROS {
                        let n = *np_.add(kk * nblk + b0 + v);
                        for p in 0..ROWS {
                            acc[p][v] = _mm512_mask_sub_epi16(acc[p][v], n, acc[p][v], xb[p]);
                        }
                    }
                }
            }
            widen(&mut wide, &acc);
            k0 = k1;
        }
        store::<V>(&wide, ZEROS, sums, np, b0, cout, out, r);
    }

    /// Output pixels per depthwise pass (independent accumulators).
    const SEG: usize = 16;

    /// Depthwise over one image (any kernel up to 15 x 15: `225 * 127 < 2^15`), channels in
    /// 16-bit lanes, reading the image quantized into a zero border (`x` as
    /// [`super::quantize_padded`] writes it, `h + 2 pad` rows of `w + 2 pad` pixels, with
    /// [`dw_slack`] elements after it): for each block of 32 channels and each tap, the
    /// tap's two masks are loaded once and a segment of output pixels of a row (16, or
    /// 8 / 4 / 2 for short rows) each gets one plain load and a masked add and subtract
    /// (independent chains, kept in registers; no tap needs a bounds mask: the border holds
    /// zeros; pixels past the row's end and lanes past the channels read neighbouring data
    /// that is never written out). Integer sums identical to [`super::dw_image`].
    /// Masks `[tap][c / 32]`.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    pub unsafe fn dw_image(g: &sbdnet_kernels::conv::ConvGeom, x: &[i16], mp: &[u32], mn: &[u32], out: &mut Out) {
        let c = g.cin;
        let nblk = c.div_ceil(32);
        assert!(g.kh <= 15 && g.kw <= 15);
        assert!(x.len() >= (g.h + 2 * g.pad) * (g.w + 2 * g.pad) * c + dw_slack(g));
        out.check(g.oh * g.ow * c, c);
        assert!(mp.len() >= g.kh * g.kw * nblk && mn.len() >= g.kh * g.kw * nblk);
        // Short rows (the 7x7, 4x4 and 2x2 layers) take the shortest segment that covers
        // them: a pixel past the row still costs a load and two adds.
        let len = match g.ow {
            0..=2 => 2,
            3..=4 => 4,
            5..=8 => 8,
            _ => SEG,
        };
        for ox0 in (0..g.ow).step_by(len) {
            let np = len.min(g.ow - ox0);
            for oy in 0..g.oh {
                for blk in 0..nblk {
                    match len {
                        2 => dw_run::<2>(g, x, mp, mn, out, oy, ox0, np, blk),
                        4 => dw_run::<4>(g, x, mp, mn, out, oy, ox0, np, blk),
                        8 => dw_run::<8>(g, x, mp, mn, out, oy, ox0, np, blk),
                        _ => dw_run::<SEG>(g, x, mp, mn, out, oy, ox0, np, blk),
                    }
                }
            }
        }
    }

    /// Elements [`dw_image`] may read past the padded image: the last segment's pixels past
    /// the row's end and the last block's lanes past the channels.
    pub fn dw_slack(g: &sbdnet_kernels::conv::ConvGeom) -> usize {
        SEG * g.stride * g.cin + 64
    }

    /// Output row `oy`, pixels `ox0..ox0 + np` (`S` computed), channel block `blk` of
    /// [`dw_image`].
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    unsafe fn dw_run<const S: usize>(
        g: &sbdnet_kernels::conv::ConvGeom,
        x: &[i16],
        mp: &[u32],
        mn: &[u32],
        out: &mut Out,
        oy: usize,
        ox0: usize,
        np: usize,
        blk: usize,
    ) {
        let c = g.cin;
        let nblk = c.div_ceil(32);
        let c0 = blk * 32;
        let lanes = (c - c0).min(32);
        let (wp, step) = (g.w + 2 * g.pad, g.stride * c);
        let mut acc = [_mm512_setzero_si512(); S];
        for ky in 0..g.kh {
            let row = x.as_ptr().add(((oy * g.stride + ky) * wp + ox0 * g.stride) * c + c0);
            for kx in 0..g.kw {
                let t = ky * g.kw + kx;
                let (p, n) = (mp[t * nblk + blk], mn[t * nblk + blk]);
                let mut q = row.add(kx * c);
                for a in acc.iter_mut() {
                    let xv = _mm512_loadu_si512(q.cast());
                    *a = sub_w(add_w(*a, p, xv), n, xv);
                    q = q.wrapping_add(step);
                }
            }
        }
        let mut mx = [_mm512_setzero_ps(); 2];
        let n = [lanes.min(16), lanes.saturating_sub(16)];
        let m = [lanes16(n[0]), lanes16(n[1])];
        let sb = [affine16(out, c0, m[0]), affine16(out, c0 + 16, m[1])];
        for (i, &a) in acc.iter().enumerate().take(np) {
            let at = (oy * g.ow + ox0 + i) * c + c0;
            let halves = [_mm512_castsi512_si256(a), _mm512_extracti64x4_epi64::<1>(a)];
            for (h, &v) in halves.iter().enumerate() {
                if n[h] > 0 {
                    emit(out, &mut mx[h], at + 16 * h, sb[h], m[h], _mm512_cvtepi16_epi32(v));
                }
            }
        }
        for h in 0..2 {
            if n[h] > 0 {
                out.merge_max(c0 + 16 * h, m[h], mx[h]);
            }
        }
    }

    #[cfg(not(target_arch = "x86_64"))]
    pub unsafe fn dw_image(_: &sbdnet_kernels::conv::ConvGeom, _: &[i16], _: &[u32], _: &[u32], _: &mut super::Out) {
        unreachable!("masks are planned only on x86_64")
    }

    #[cfg(not(target_arch = "x86_64"))]
    pub unsafe fn lut_rows(
        _: super::Rows,
        _: usize,
        _: usize,
        _: &[u16],
        _: &mut super::Out,
        _: &mut [i32],
        _: &mut [i16],
    ) {
        unreachable!("tables are planned only on x86_64")
    }

    #[cfg(not(target_arch = "x86_64"))]
    pub unsafe fn lut_rows_vbmi(
        _: &[i16],
        _: usize,
        _: usize,
        _: &[u16],
        _: &mut super::Out,
        _: &mut [i32],
        _: &mut [i16],
    ) {
        unreachable!("tables are planned only on x86_64")
    }

    #[cfg(not(target_arch = "x86_64"))]
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn pw_rows(
        _: &[i16],
        _: usize,
        _: usize,
        _: &[u32],
        _: &[u32],
        _: bool,
        _: &mut super::Out,
        _: &mut [i32],
    ) {
        unreachable!("masks are planned only on x86_64")
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

    /// Per-image quantization written out in scalar code, independent of the kernels' own
    /// (portable and AVX-512) versions: `q = clamp(round_half_even(x * 127 / max|x|))`,
    /// NaN to -127, all zero when `max |x|` (NaN skipped) is 0 or not finite.
    fn reference_quantize(x: &[f32], q: &mut [i16]) -> f32 {
        let amax = x.iter().filter(|v| !v.is_nan()).fold(0.0f32, |m, v| m.max(v.abs()));
        if !(amax > 0.0 && amax.is_finite()) {
            q.fill(0);
            return 1.0;
        }
        let inv = 127.0 / amax;
        for (q, &v) in q.iter_mut().zip(x) {
            let y = (v * inv).round_ties_even();
            *q = if y.is_nan() { -127 } else { y.clamp(-127.0, 127.0) as i16 };
        }
        amax / 127.0
    }

    fn check(g: ConvGeom, zero_every: usize, seed: u64) {
        check_layout(g, zero_every, seed, Layout::Auto);
        check_layout(g, zero_every, seed, Layout::Wide);
        if avx2::available() && (g.groups > 1 || (g.kh == 1 && g.kw == 1 && g.stride == 1 && g.pad == 0)) {
            check_layout(g, zero_every, seed, Layout::Sign);
        }
        if avx512::available() {
            check_layout(g, zero_every, seed, Layout::Bits);
            if g.groups == 1 {
                check_layout(g, zero_every, seed, Layout::Lut(false));
                if avx512::vbmi() {
                    check_layout(g, zero_every, seed, Layout::Lut(true));
                }
            }
        }
    }

    fn check_layout(g: ConvGeom, zero_every: usize, seed: u64, layout: Layout) {
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
        check_with(g, &x, &w, layout);
    }

    /// The layer's `f32` output against the exact integer sums times the image scales.
    fn check_with(g: ConvGeom, x: &[f32], w: &[f32], layout: Layout) {
        let zero_every = w.iter().filter(|&&v| v == 0.0).count();
        let conv = A8Conv::with_layout(g, w, layout);
        let mut s = QuantScratch::default();
        s.reserve(&conv);
        let mut y = vec![0.0f32; g.out_len()];
        conv.forward(g.batch, x, &mut y, &mut s, false);
        // Recompute the quantized input and the exact integer sums: one scale per image, or
        // for a depthwise layer one per image and channel (channel `c` of the output reads
        // only channel `c` of the input).
        let il = g.h * g.w * g.cin;
        let mut q = vec![0i16; g.in_len()];
        let mut scales = Vec::new();
        for b in 0..g.batch {
            let (xb, qb) = (&x[b * il..][..il], &mut q[b * il..][..il]);
            if conv.depthwise() {
                for c in 0..g.cin {
                    let xc: Vec<f32> = xb.iter().skip(c).step_by(g.cin).copied().collect();
                    let mut qc = vec![0i16; xc.len()];
                    scales.push(reference_quantize(&xc, &mut qc));
                    for (p, v) in qc.into_iter().enumerate() {
                        qb[p * g.cin + c] = v;
                    }
                }
            } else {
                scales.push(reference_quantize(xb, qb));
            }
        }
        let want = reference(&g, &q, w);
        let ol = g.oh * g.ow * g.cout;
        for (i, (&got, &exact)) in y.iter().zip(&want).enumerate() {
            let scale = if conv.depthwise() { scales[i / ol * g.cout + i % g.cout] } else { scales[i / ol] };
            let expect = exact as f32 * scale;
            assert_eq!(got, expect, "{g:?} {layout:?} ({zero_every} zero weights) at {i}");
        }
    }

    #[test]
    fn fused_affine_equals_raw_sums_then_the_affine_pass() {
        let mut rng = sbdnet_kernels::rng::Rng::new(11);
        for (i, &(b, h, cin, cout, k, stride, pad, groups)) in [
            (2, 4, 40, 150, 1, 1, 0, 1),
            (1, 5, 20, 37, 1, 1, 0, 1),
            (2, 7, 70, 70, 3, 2, 1, 70),
            (1, 5, 3, 40, 3, 1, 1, 1),
            // 81 pixels: a full 64-pixel pass and a partial one of the AVX2 pointwise kernel
            // (its per-channel maxima must skip the idle lanes).
            (2, 9, 24, 20, 1, 1, 0, 1),
        ]
        .iter()
        .enumerate()
        {
            let g = ConvGeom::new(b, h, h, cin, cout, k, stride, pad, groups).unwrap();
            let mut x: Vec<f32> = (0..g.in_len()).map(|_| rng.normal()).collect();
            if b == 2 {
                // An all-zero image: zero sums, so -0.0 biases meet -0.0 products.
                let il = g.in_len() / 2;
                x[il..].fill(0.0);
            }
            let w: Vec<f32> = (0..g.weight_len()).map(|_| if rng.uniform() < 0.5 { -1.0 } else { 1.0 }).collect();
            let scale: Vec<f32> = (0..cout).map(|c| if c % 7 == 0 { -0.25 } else { rng.normal() * 0.01 }).collect();
            let mut bias: Vec<f32> = (0..cout).map(|_| rng.normal()).collect();
            bias[0] = -0.0;
            bias[1] = 0.0;
            let mut layouts = vec![Layout::Auto];
            if avx2::available() && (groups > 1 || k == 1) {
                layouts.push(Layout::Sign);
            }
            if avx512::available() {
                layouts.push(Layout::Bits);
                if groups == 1 {
                    layouts.push(Layout::Lut(false));
                }
            }
            for layout in layouts {
                let conv = A8Conv::with_layout(g, &w, layout);
                if !conv.fuses_affine() {
                    continue;
                }
                for act in [Act::None, Act::Relu, Act::Hardtanh] {
                    let mut s = QuantScratch::default();
                    s.reserve(&conv);
                    let (mut raw, mut want, mut got) =
                        (vec![0.0; g.out_len()], vec![0.0; g.out_len()], vec![0.0; g.out_len()]);
                    conv.forward_raw(b, &x, &mut raw, &mut s, false);
                    let ol = g.out_len() / b;
                    let mut maxes = vec![0.0f32; b];
                    for (img, (r, y)) in raw.chunks_exact(ol).zip(want.chunks_exact_mut(ol)).enumerate() {
                        let mut m = [0.0f32];
                        crate::plan::affine_rows_scaled_max(r, cout, s.image_scale(img), &scale, &bias, act, y, &mut m);
                        maxes[img] = m[0];
                    }
                    conv.forward_affine(b, &x, &mut got, &mut s, false, &scale, &bias, act);
                    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                    assert_eq!(bits(&got), bits(&want), "case {i} {layout:?} {act:?}");
                    assert_eq!(bits(&s.known[..b]), bits(&maxes), "case {i} {layout:?} {act:?}");
                    // And the per-channel maxima a depthwise layer after it reads instead of a pass.
                    assert!(s.known_ch_valid);
                    for (img, y) in got.chunks_exact(ol).enumerate() {
                        let mut m = vec![0.0f32; cout];
                        channel_abs_max(y, &mut m);
                        assert_eq!(bits(&s.known_ch[img * cout..][..cout]), bits(&m), "case {i} {layout:?} {act:?}");
                    }
                }
            }
        }
    }

    /// The AVX2 pointwise kernel's last pass of an 81-pixel image has 17 real pixels: its
    /// 47 idle lanes (zero inputs, output `bias`) must not enter the per-channel maxima.
    /// Positive inputs and weights make every real output `0 < s * k * sum` away from the
    /// bias of -5, so `|y| < 5` and an idle lane would raise the max to 5.
    #[test]
    fn avx2_pointwise_maxima_skip_idle_lanes() {
        if !avx2::available() {
            eprintln!("no AVX2 here (or a forced fallback): nothing to compare");
            return;
        }
        let g = ConvGeom::new(1, 9, 9, 24, 20, 1, 1, 0, 1).unwrap();
        let mut rng = sbdnet_kernels::rng::Rng::new(3);
        let x: Vec<f32> = (0..g.in_len()).map(|_| 0.5 + 0.5 * rng.uniform()).collect();
        let w = vec![1.0f32; g.weight_len()];
        let (scale, bias) = (vec![0.01f32; 20], vec![-5.0f32; 20]);
        let conv = A8Conv::with_layout(g, &w, Layout::Sign);
        let mut s = QuantScratch::default();
        s.reserve(&conv);
        let mut y = vec![0.0f32; g.out_len()];
        conv.forward_affine(1, &x, &mut y, &mut s, false, &scale, &bias, Act::None);
        let mut m = vec![0.0f32; 20];
        channel_abs_max(&y, &mut m);
        assert!(m.iter().all(|&v| v < 5.0));
        assert_eq!(&s.known_ch[..20], &m[..]);
    }

    #[test]
    fn simd_quantization_equals_the_portable_one() {
        if !avx512::available() && !avx2::available() {
            eprintln!("no AVX-512 or AVX2 here (or a forced fallback): nothing to compare");
            return;
        }
        let mut rng = sbdnet_kernels::rng::Rng::new(7);
        let mut x: Vec<f32> = (0..1000).map(|_| rng.normal() * 3.0).collect();
        x.extend([f32::NAN, -f32::NAN, 0.5, 1.5, 2.5, -0.5, -1.5, -2.5, -0.0, 126.5, 127.0, -127.5, 1e30, -1e30]);
        x.extend([f32::INFINITY, f32::NEG_INFINITY, f32::MIN_POSITIVE, 0.49999997]);
        // The special values last (in the 16-lane tail) and first (in the 32-lane blocks).
        let mut first = x.clone();
        first.rotate_left(1000);
        for x in [&x, &first] {
            for inv in [1.0f32, 0.37, 42.0, f32::INFINITY] {
                // Lengths around the 32-value blocks and the 16-lane tail.
                for n in [x.len(), 65, 64, 63, 33, 32, 31, 17, 16, 15, 1, 0] {
                    let (mut want, mut got) = (vec![0i16; n], vec![9i16; n]);
                    quantize_into(&x[..n], &mut want, inv);
                    // SAFETY: checked above (one of the two is available).
                    unsafe {
                        if avx512::available() {
                            avx512::quantize_into(&x[..n], &mut got, inv)
                        } else {
                            avx2::quantize_into(&x[..n], &mut got, inv)
                        }
                    };
                    assert_eq!(got, want, "inv {inv} n {n}");
                }
            }
        }
    }

    #[test]
    fn per_channel_scales_and_quantization_match_the_portable_ones() {
        let mut rng = sbdnet_kernels::rng::Rng::new(9);
        // Channel counts around the 16-lane pieces and the 128-channel register blocks.
        for c in [1, 15, 16, 17, 40, 128, 131, 300] {
            let px = 37;
            let mut x: Vec<f32> = (0..px * c).map(|_| rng.normal() * 2.0).collect();
            // Channel 0 all zero but for a NaN; the last channel holds an infinity; some NaN.
            for p in 0..px {
                x[p * c] = if p == 3 { f32::NAN } else { 0.0 };
            }
            x[5 * c + c - 1] = f32::INFINITY;
            x[7 * c + c / 2] = f32::NAN;
            let (mut kc, mut inv) = (vec![0.0f32; c], vec![0.0f32; c]);
            channel_abs_max_of(&x, &mut kc);
            channel_scales(&mut kc, &mut inv);
            let mut want = vec![0.0f32; c];
            channel_abs_max(&x, &mut want);
            for ch in 0..c {
                let m = (0..px).map(|p| x[p * c + ch].abs()).filter(|v| !v.is_nan()).fold(0.0f32, f32::max);
                assert_eq!(want[ch], m, "c {c} channel {ch}");
                let live = m > 0.0 && m.is_finite() && (127.0 / m).is_finite();
                let (k, i) = if live { (m / 127.0, 127.0 / m) } else { (1.0, 0.0) };
                assert_eq!((kc[ch], inv[ch]), (k, i), "c {c} channel {ch}");
            }
            let (mut got, mut port) = (vec![9i16; x.len()], vec![7i16; x.len()]);
            quantize_channels(&x, &mut got, &inv);
            quantize_channels_portable(&x, &mut port, &inv);
            assert_eq!(got, port, "c {c}");
            for p in 0..px {
                assert_eq!(got[p * c], 0, "a zero channel stays zero (NaN included)");
                if c > 1 {
                    assert_eq!(got[p * c + c - 1], 0, "a channel with an infinite max is zero");
                }
            }
        }
    }

    #[test]
    fn a8_accumulators_do_not_overflow() {
        // Every activation at +-127 and every weight equal: each 16-bit run reaches its
        // largest sum (256 * 127 for additions, 51 tables of 5 * 127 for lookups).
        let g = ConvGeom::new(1, 2, 2, 700, 160, 1, 1, 0, 1).unwrap();
        let mut layouts = vec![Layout::Wide];
        if avx2::available() {
            layouts.push(Layout::Sign);
        }
        if avx512::available() {
            layouts.extend([Layout::Bits, Layout::Lut(false)]);
        }
        if avx512::vbmi() {
            layouts.push(Layout::Lut(true));
        }
        for layout in layouts {
            for (xv, wv) in [(1.0f32, 1.0f32), (-1.0, 1.0), (1.0, -1.0)] {
                let x = vec![xv; g.in_len()];
                check_with(g, &x, &vec![wv; g.weight_len()], layout);
            }
        }
    }

    #[test]
    fn a8_kernels_match_the_integer_reference() {
        for (i, &(b, h, cin, cout, k, stride, pad, groups)) in [
            (1, 5, 7, 9, 1, 1, 0, 1),
            (3, 4, 300, 70, 1, 1, 0, 1),
            // Three 256-input runs; 7 blocks of 32 channels (tiles of 4 and 3) with a partial
            // last one; 9 pixels (a tile of 1).
            (1, 3, 600, 200, 1, 1, 0, 1),
            // The AVX2 pointwise kernel's passes of 64 pixels: 81 = 64 + 17 and 144 = 2 * 64
            // + 16, with channel counts off the 8-channel transposes.
            (1, 9, 40, 20, 1, 1, 0, 1),
            (2, 12, 24, 67, 1, 1, 0, 1),
            (2, 6, 16, 16, 3, 1, 1, 16),
            (2, 7, 70, 70, 3, 2, 1, 70),
            (1, 9, 32, 32, 3, 1, 1, 32),
            (1, 6, 130, 130, 5, 2, 2, 130),
            (1, 21, 40, 40, 3, 1, 1, 40),
            // Depthwise rows of 2 and 4 pixels (the shortest segments), a partial channel block.
            (2, 4, 48, 48, 3, 2, 1, 48),
            (1, 4, 1040, 1040, 3, 1, 1, 1040),
            // Depthwise without padding (no border), and a 5x5 kernel over a border of 2
            // with stride 1 and two segments per row.
            (2, 8, 40, 40, 3, 1, 0, 40),
            (1, 19, 33, 33, 5, 1, 2, 33),
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

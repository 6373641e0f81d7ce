//! The deployed layer graph: what a `.sbd` file describes, with BatchNorm and `alpha` already
//! folded, and its validation.
//!
//! Values: value `0` is the input image (`f32`, NHWC); layer `i` writes value `i + 1`. A value
//! is either `f32` (NHWC) or `bits` (channels packed into `u64` words per pixel, as in
//! [`sbdnet_kernels::binary`]: `+1` is bit `0`, channel `c` is bit `c % 64` of word `c / 64`,
//! padding bits `0`). Which one is decided by the layer that writes it; [`Graph::validate`]
//! computes every value's shape and kind and checks each layer's tensors against them.

use crate::error::{graph_err, RuntimeError};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;

/// The current `.sbd` format version. Readers reject other versions.
pub const FORMAT_VERSION: u32 = 1;

/// Activation function applied after a per-channel affine.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
#[repr(u8)]
pub enum Act {
    /// Identity.
    #[default]
    None = 0,
    /// `max(x, 0)`.
    Relu,
    /// `clamp(x, -1, 1)`.
    Hardtanh,
}

impl Act {
    /// Apply to one value (Hardtanh as training computes it: `max` then `min`, so NaN maps
    /// to `-1`, not NaN as `clamp` would give).
    #[inline]
    #[allow(clippy::manual_clamp)]
    pub fn apply(self, x: f32) -> f32 {
        match self {
            Act::None => x,
            Act::Relu => x.max(0.0),
            Act::Hardtanh => x.max(-1.0).min(1.0),
        }
    }
}

/// How a convolution's weights are stored.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Weights {
    /// `f32`, OHWI `[cout][k][k][cin / groups]`.
    Float {
        /// Tensor name.
        tensor: String,
    },
    /// Sign bits (`+1` = bit `0`). Dense (`groups == 1`): `[cout][k][k][words(cin)]` words;
    /// depthwise (`groups == cin == cout`): tap-major `[k*k][words(c)]` words. The scale
    /// `alpha` is folded into the output stage.
    Binary {
        /// Tensor name (`U64`).
        bits: String,
        /// Group mask of a sparse binary layer: `U8`, one byte per group, `1` = kept, `0` = the
        /// whole group is zero. Dense: `[cout][k*k][ceil(cin / group_size)]`, a group being
        /// `group_size` consecutive input channels of one output channel at one tap (as the
        /// training checkpoint's `group_mask`); depthwise: `[c]`, one group per channel's
        /// whole kernel.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        mask: Option<String>,
        /// Input channels per group of a dense layer's mask.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        group_size: Option<usize>,
    },
}

/// What a convolution does with its raw output `s` (the dot product: an exact integer for
/// binary weights on binary inputs, `sum(+-x)` for binary weights on `f32` inputs, the usual
/// sum of products for float weights).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Output {
    /// `f32` output `act(scale[c] * s + bias[c])` (BatchNorm and `alpha` folded).
    Affine {
        /// Per-channel scale tensor (`F32`, `[cout]`).
        scale: String,
        /// Per-channel bias tensor (`F32`, `[cout]`).
        bias: String,
        /// Activation.
        #[serde(default)]
        act: Act,
    },
    /// `bits` output of a binary layer on binary inputs: one integer threshold per channel
    /// (BatchNorm, `alpha`, the activation and the next layer's binarization threshold folded,
    /// see [`sbdnet_kernels::binary::fold_bn_sign`]): output `+1` iff `s > thr[c]`, or
    /// `s < thr[c]` where `flip[c] = 1`.
    Threshold {
        /// `I32`, `[cout]`.
        thr: String,
        /// `U8`, `[cout]`, `0` or `1`.
        flip: String,
    },
    /// `bits` output from a float value: `+1` iff `act(scale[c] * s + bias[c]) > t[c]`.
    Sign {
        /// Per-channel scale (`F32`, `[cout]`).
        scale: String,
        /// Per-channel bias (`F32`, `[cout]`).
        bias: String,
        /// Activation before the comparison.
        #[serde(default)]
        act: Act,
        /// Thresholds (`F32`, `[cout]`).
        t: String,
    },
}

impl Output {
    /// Whether this output is packed bits.
    pub fn is_bits(&self) -> bool {
        !matches!(self, Output::Affine { .. })
    }
}

/// A convolution (dense or depthwise) with its folded output stage.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Conv {
    /// Input channels.
    pub cin: usize,
    /// Output channels.
    pub cout: usize,
    /// Square kernel size.
    pub k: usize,
    /// Stride.
    pub stride: usize,
    /// Zero padding on every side.
    pub pad: usize,
    /// `1` (dense) or `cin` (depthwise, `cout == cin`).
    pub groups: usize,
    /// Weights.
    pub weights: Weights,
    /// Output stage.
    pub output: Output,
}

impl Conv {
    /// Whether the weights are binary.
    pub fn binary(&self) -> bool {
        matches!(self.weights, Weights::Binary { .. })
    }
    /// Whether this is a depthwise convolution.
    pub fn depthwise(&self) -> bool {
        self.groups > 1
    }
}

/// One deployed operation.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Op {
    /// Convolution.
    Conv(Conv),
    /// Fully connected on a flattened `f32` value: `y = W x + b`, `W` `[out][inp]`.
    Linear {
        /// Inputs.
        inp: usize,
        /// Outputs.
        out: usize,
        /// `F32` `[out][inp]`.
        weight: String,
        /// `F32` `[out]`.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        bias: Option<String>,
    },
    /// `f32` to `bits`: `+1` iff `x > t[c]`.
    Binarize {
        /// Thresholds (`F32`, `[c]`).
        t: String,
    },
    /// Per-channel `act(scale * x + bias)` on an `f32` value (a BatchNorm that follows
    /// something other than a convolution).
    Affine {
        /// `F32` `[c]`.
        scale: String,
        /// `F32` `[c]`.
        bias: String,
        /// Activation.
        #[serde(default)]
        act: Act,
    },
    /// Activation on an `f32` value.
    Activation {
        /// Which.
        act: Act,
    },
    /// Max or average pooling (no padding).
    Pool {
        /// Window.
        k: usize,
        /// Stride.
        stride: usize,
        /// Max (`true`) or average.
        max: bool,
    },
    /// Global average pooling to `1 x 1 x c`.
    GlobalAvgPool,
    /// Flatten (NHWC order; no data movement).
    Flatten,
    /// Sum of two `f32` values of one shape (residual).
    Add,
}

/// One layer: an operation and the values it reads.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Layer {
    /// Name from the training graph (`block2.pw`).
    pub name: String,
    /// Values read: one, or two for `Add`. Layer `i` writes value `i + 1`.
    pub inputs: Vec<usize>,
    /// The operation.
    #[serde(flatten)]
    pub op: Op,
}

/// A deployed model.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Graph {
    /// Model name (`dscnn`).
    pub name: String,
    /// Training precision (`float`, `w1`, `w1a1`, ...), informational.
    pub precision: String,
    /// Input `[h, w, c]`.
    pub input: [usize; 3],
    /// Output classes (the last value's length).
    pub classes: usize,
    /// Per-channel input normalization used in training: the runtime's input is
    /// `(pixel / 255 - mean[c]) / std[c]` (the caller applies it; `infer` does).
    pub mean: Vec<f32>,
    /// See `mean`.
    pub std: Vec<f32>,
    /// Layers in execution order.
    pub layers: Vec<Layer>,
}

/// Element type of a stored tensor.
#[derive(Clone, Debug, PartialEq)]
pub enum TensorData {
    /// 32-bit floats.
    F32(Vec<f32>),
    /// Packed bit words.
    U64(Vec<u64>),
    /// Integer thresholds.
    I32(Vec<i32>),
    /// Flags and masks.
    U8(Vec<u8>),
}

impl TensorData {
    /// Element count.
    pub fn len(&self) -> usize {
        match self {
            TensorData::F32(v) => v.len(),
            TensorData::U64(v) => v.len(),
            TensorData::I32(v) => v.len(),
            TensorData::U8(v) => v.len(),
        }
    }
    /// True when empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Stored bytes.
    pub fn bytes(&self) -> usize {
        match self {
            TensorData::F32(v) => 4 * v.len(),
            TensorData::U64(v) => 8 * v.len(),
            TensorData::I32(v) => 4 * v.len(),
            TensorData::U8(v) => v.len(),
        }
    }
    fn dtype(&self) -> &'static str {
        match self {
            TensorData::F32(_) => "F32",
            TensorData::U64(_) => "U64",
            TensorData::I32(_) => "I32",
            TensorData::U8(_) => "U8",
        }
    }
}

/// Named tensors of a model.
pub type Tensors = HashMap<String, TensorData>;

/// Kind of a value.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// `f32` NHWC.
    F32,
    /// Packed bits.
    Bits,
}

/// Shape and kind of a value (per image).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ValueInfo {
    /// Height.
    pub h: usize,
    /// Width.
    pub w: usize,
    /// Channels.
    pub c: usize,
    /// Kind.
    pub kind: Kind,
}

impl ValueInfo {
    /// Elements per image (`f32` values, or channels x pixels for bits).
    pub fn len(&self) -> usize {
        self.h * self.w * self.c
    }
    /// True when empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Storage per image in elements: `f32`s, or `u64` words for bits.
    pub fn storage(&self) -> usize {
        match self.kind {
            Kind::F32 => self.len(),
            Kind::Bits => self.h * self.w * sbdnet_kernels::binary::words(self.c),
        }
    }
}

/// Largest accepted spatial size (pixels per image) and channel count: bounds every buffer the
/// planner sizes from a file's declared shapes.
pub const MAX_PIXELS: usize = 1 << 20;
/// See [`MAX_PIXELS`].
pub const MAX_CHANNELS: usize = 1 << 16;
/// Largest accepted kernel size.
pub const MAX_KERNEL: usize = 15;

/// Look up a tensor of a given type and length.
pub(crate) fn tensor<'a>(
    t: &'a Tensors,
    layer: &str,
    name: &str,
    dtype: &'static str,
    len: usize,
) -> Result<&'a TensorData, RuntimeError> {
    let d = t.get(name).ok_or_else(|| graph_err(layer, format!("tensor {name} is missing")))?;
    if d.dtype() != dtype || d.len() != len {
        return Err(graph_err(
            layer,
            format!("tensor {name} is {} x {}, expected {dtype} x {len}", d.dtype(), d.len()),
        ));
    }
    Ok(d)
}

/// `f32` tensor by name, checked.
pub(crate) fn f32s<'a>(t: &'a Tensors, layer: &str, name: &str, len: usize) -> Result<&'a [f32], RuntimeError> {
    match tensor(t, layer, name, "F32", len)? {
        TensorData::F32(v) => Ok(v),
        _ => unreachable!("dtype checked"),
    }
}

/// `u64` tensor by name, checked.
pub(crate) fn u64s<'a>(t: &'a Tensors, layer: &str, name: &str, len: usize) -> Result<&'a [u64], RuntimeError> {
    match tensor(t, layer, name, "U64", len)? {
        TensorData::U64(v) => Ok(v),
        _ => unreachable!("dtype checked"),
    }
}

/// `i32` tensor by name, checked.
pub(crate) fn i32s<'a>(t: &'a Tensors, layer: &str, name: &str, len: usize) -> Result<&'a [i32], RuntimeError> {
    match tensor(t, layer, name, "I32", len)? {
        TensorData::I32(v) => Ok(v),
        _ => unreachable!("dtype checked"),
    }
}

/// `u8` tensor by name, checked.
pub(crate) fn u8s<'a>(t: &'a Tensors, layer: &str, name: &str, len: usize) -> Result<&'a [u8], RuntimeError> {
    match tensor(t, layer, name, "U8", len)? {
        TensorData::U8(v) => Ok(v),
        _ => unreachable!("dtype checked"),
    }
}

/// Number of mask groups of a binary convolution: `(groups per tap of one output channel,
/// total)`.
pub fn mask_groups(c: &Conv, group_size: Option<usize>) -> Result<(usize, usize), String> {
    if c.depthwise() {
        return Ok((1, c.cout));
    }
    let g = group_size.ok_or("a dense layer's mask needs group_size")?;
    if g == 0 || g > c.cin {
        return Err(format!("group_size {g} must be in 1..={}", c.cin));
    }
    let per = c.cin.div_ceil(g);
    Ok((per, per * c.k * c.k * c.cout))
}

/// Words of a binary convolution's packed weights.
pub fn binary_weight_words(c: &Conv) -> usize {
    use sbdnet_kernels::binary::words;
    if c.depthwise() {
        c.k * c.k * words(c.cin)
    } else {
        c.cout * c.k * c.k * words(c.cin)
    }
}

impl Graph {
    /// Check the graph against its tensors and return every value's shape and kind
    /// (`values[0]` is the input). Every later stage relies on this having passed: the
    /// loader calls it, so a hostile file cannot make the planner index out of bounds or
    /// size a buffer from an absurd shape.
    pub fn validate(&self, t: &Tensors) -> Result<Vec<ValueInfo>, RuntimeError> {
        let [h, w, c] = self.input;
        let bad_dims = |h: usize, w: usize, c: usize| {
            h == 0 || w == 0 || c == 0 || h.saturating_mul(w) > MAX_PIXELS || c > MAX_CHANNELS
        };
        if bad_dims(h, w, c) {
            return Err(graph_err("input", format!("input shape {h}x{w}x{c} is out of range")));
        }
        if self.mean.len() != c || self.std.len() != c || self.std.iter().any(|s| s.is_nan() || *s <= 0.0) {
            return Err(graph_err("input", "mean/std must have one entry per input channel, std > 0"));
        }
        let mut vals = vec![ValueInfo { h, w, c, kind: Kind::F32 }];
        for (i, l) in self.layers.iter().enumerate() {
            let name = if l.name.is_empty() { format!("#{i}") } else { l.name.clone() };
            let name = name.as_str();
            let want_inputs = if matches!(l.op, Op::Add) { 2 } else { 1 };
            if l.inputs.len() != want_inputs || l.inputs.iter().any(|&v| v > i) {
                return Err(graph_err(name, format!("must read {want_inputs} earlier value(s), reads {:?}", l.inputs)));
            }
            let x = vals[l.inputs[0]];
            let f32_in = |what: &str| -> Result<(), RuntimeError> {
                if x.kind != Kind::F32 {
                    return Err(graph_err(name, format!("{what} needs an f32 input, got packed bits")));
                }
                Ok(())
            };
            let out = match &l.op {
                Op::Conv(cv) => {
                    if cv.cin != x.c || cv.cout == 0 || cv.cout > MAX_CHANNELS {
                        return Err(graph_err(name, format!("cin {} / cout {} vs input {}", cv.cin, cv.cout, x.c)));
                    }
                    if cv.k == 0 || cv.k > MAX_KERNEL || cv.stride == 0 || cv.stride > cv.k.max(2) || cv.pad >= cv.k {
                        return Err(graph_err(name, format!("kernel {} stride {} pad {}", cv.k, cv.stride, cv.pad)));
                    }
                    if !(cv.groups == 1 || (cv.groups == cv.cin && cv.cout == cv.cin && cv.groups > 1)) {
                        return Err(graph_err(name, "groups must be 1 or cin (= cout, depthwise)"));
                    }
                    if x.h + 2 * cv.pad < cv.k || x.w + 2 * cv.pad < cv.k {
                        return Err(graph_err(name, "kernel larger than the padded input"));
                    }
                    let oh = (x.h + 2 * cv.pad - cv.k) / cv.stride + 1;
                    let ow = (x.w + 2 * cv.pad - cv.k) / cv.stride + 1;
                    let n = cv.cout;
                    match &cv.weights {
                        Weights::Float { tensor } => {
                            if x.kind != Kind::F32 {
                                return Err(graph_err(name, "float weights need an f32 input"));
                            }
                            f32s(t, name, tensor, cv.cout * cv.k * cv.k * (cv.cin / cv.groups))?;
                        }
                        Weights::Binary { bits, mask, group_size } => {
                            if cv.depthwise() && cv.k != 3 && x.kind == Kind::Bits {
                                return Err(graph_err(name, "a binary depthwise layer on bits must be 3x3"));
                            }
                            u64s(t, name, bits, binary_weight_words(cv))?;
                            if let Some(m) = mask {
                                let (_, total) = mask_groups(cv, *group_size).map_err(|e| graph_err(name, e))?;
                                let mv = u8s(t, name, m, total)?;
                                if mv.iter().any(|&b| b > 1) {
                                    return Err(graph_err(name, "mask entries must be 0 or 1"));
                                }
                            }
                        }
                    }
                    match &cv.output {
                        Output::Affine { scale, bias, .. } => {
                            f32s(t, name, scale, n)?;
                            f32s(t, name, bias, n)?;
                        }
                        Output::Threshold { thr, flip } => {
                            if !(cv.binary() && x.kind == Kind::Bits) {
                                return Err(graph_err(name, "integer thresholds need binary weights and bits in"));
                            }
                            i32s(t, name, thr, n)?;
                            if u8s(t, name, flip, n)?.iter().any(|&b| b > 1) {
                                return Err(graph_err(name, "flip entries must be 0 or 1"));
                            }
                        }
                        Output::Sign { scale, bias, t: th, .. } => {
                            f32s(t, name, scale, n)?;
                            f32s(t, name, bias, n)?;
                            f32s(t, name, th, n)?;
                        }
                    }
                    if !cv.binary() && x.kind == Kind::Bits {
                        return Err(graph_err(name, "bits input needs binary weights"));
                    }
                    let kind = if cv.output.is_bits() { Kind::Bits } else { Kind::F32 };
                    ValueInfo { h: oh, w: ow, c: n, kind }
                }
                Op::Linear { inp, out, weight, bias } => {
                    f32_in("linear")?;
                    if *inp != x.len() || *out == 0 || *out > MAX_CHANNELS {
                        return Err(graph_err(name, format!("inp {inp} vs input of {} values", x.len())));
                    }
                    f32s(t, name, weight, inp * out)?;
                    if let Some(b) = bias {
                        f32s(t, name, b, *out)?;
                    }
                    ValueInfo { h: 1, w: 1, c: *out, kind: Kind::F32 }
                }
                Op::Binarize { t: th } => {
                    f32_in("binarize")?;
                    f32s(t, name, th, x.c)?;
                    ValueInfo { kind: Kind::Bits, ..x }
                }
                Op::Affine { scale, bias, .. } => {
                    f32_in("affine")?;
                    f32s(t, name, scale, x.c)?;
                    f32s(t, name, bias, x.c)?;
                    x
                }
                Op::Activation { .. } => {
                    f32_in("activation")?;
                    x
                }
                Op::Pool { k, stride, .. } => {
                    f32_in("pool")?;
                    if *k == 0 || *stride == 0 || *k > x.h || *k > x.w {
                        return Err(graph_err(name, format!("pool {k}/{stride} does not fit {}x{}", x.h, x.w)));
                    }
                    ValueInfo { h: (x.h - k) / stride + 1, w: (x.w - k) / stride + 1, ..x }
                }
                Op::GlobalAvgPool => {
                    f32_in("global average pooling")?;
                    ValueInfo { h: 1, w: 1, ..x }
                }
                Op::Flatten => {
                    f32_in("flatten")?;
                    ValueInfo { h: 1, w: 1, c: x.len(), kind: Kind::F32 }
                }
                Op::Add => {
                    f32_in("add")?;
                    let y = vals[l.inputs[1]];
                    if y != x {
                        return Err(graph_err(name, "add needs two f32 values of one shape"));
                    }
                    x
                }
            };
            if bad_dims(out.h, out.w, out.c) {
                return Err(graph_err(name, "output shape out of range"));
            }
            vals.push(out);
        }
        let last = vals.last().copied().unwrap_or(vals[0]);
        if self.layers.is_empty() || last.kind != Kind::F32 || last.len() != self.classes {
            return Err(graph_err("output", format!("the last value must be {} f32 class scores", self.classes)));
        }
        Ok(vals)
    }
}

//! The model: a graph of layers built from a [`ModelConfig`], with planned buffers.
//!
//! Activation `0` is the input; node `i` writes activation `i + 1` and reads activations with
//! smaller indices. Forward walks the nodes in order; backward walks them in reverse, adding
//! into the gradients of the activations each node read.

use crate::config::{Act, Block, ModelConfig};
use crate::error::NnError;
use crate::group::{self, GroupLayout};
use crate::layers::{BatchNorm2d, Conv2d, Dropout, Linear, Pool};
use crate::loss::Loss;
use crate::optim::Optimizer;
use crate::params::ParamStore;
use crate::quant::{BinAct, Groups, QuantConfig, WeightBinarizer};
use crate::sparse::{DiagLinear, MaskedLinear, SparseInfo, SparseKind, SparseSpec};
use crate::transformer::{self as tf, Attention, LayerNorm, PatchEmbed};
use sbdnet_kernels::elementwise as ew;
use sbdnet_kernels::pool as kpool;
use sbdnet_kernels::rng::Rng;
use sbdnet_kernels::GradMode;
use std::time::Instant;

/// Per-image shape `(h, w, c)`, NHWC.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Shape {
    /// Height.
    pub h: usize,
    /// Width.
    pub w: usize,
    /// Channels.
    pub c: usize,
}

impl Shape {
    /// Floats per image.
    pub fn len(&self) -> usize {
        self.h * self.w * self.c
    }
    /// True when empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl std::fmt::Display for Shape {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}x{}x{}", self.h, self.w, self.c)
    }
}

/// What a node computes.
#[derive(Clone, Debug)]
pub enum Op {
    /// Convolution.
    Conv(Conv2d),
    /// Batch normalization (optionally with a fused ReLU).
    BatchNorm(BatchNorm2d),
    /// ReLU.
    Relu,
    /// Hardtanh to `[-1, 1]`.
    Hardtanh,
    /// Max or average pooling.
    Pool(Pool),
    /// Global average pooling.
    GlobalAvgPool,
    /// Binary activation with trainable per-channel thresholds.
    BinAct(BinAct),
    /// Flatten (a copy; NHWC order).
    Flatten,
    /// Dropout.
    Dropout(Dropout),
    /// Fully connected.
    Linear(Linear),
    /// Diagonal-sparse fully connected (DynaDiag).
    DiagLinear(DiagLinear),
    /// Masked dense fully connected (SET, RigL).
    MaskedLinear(MaskedLinear),
    /// Sum of the two inputs.
    Add,
    /// Patch embedding (vision transformer).
    PatchEmbed(PatchEmbed),
    /// Layer normalization over each position's channels.
    LayerNorm(LayerNorm),
    /// GELU (tanh form).
    Gelu,
    /// Multi-head self-attention over each image's tokens.
    Attention(Attention),
    /// Per image, the `rows x cols` matrix of its values transposed (MLP-Mixer's token
    /// mixing: tokens x channels to channels x tokens and back).
    Transpose {
        /// Rows of the input matrix (its columns are the output's rows).
        rows: usize,
        /// Columns of the input matrix.
        cols: usize,
    },
}

impl Op {
    /// Short kind name for summaries and profiles.
    pub fn kind(&self) -> &'static str {
        match self {
            Op::Conv(c) if c.groups == c.input.c && c.groups > 1 => "conv-dw",
            Op::Conv(c) if c.k == 1 => "conv-pw",
            Op::Conv(_) => "conv",
            Op::BatchNorm(b) if b.relu => "bn+relu",
            Op::BatchNorm(_) => "bn",
            Op::Relu => "relu",
            Op::Hardtanh => "hardtanh",
            Op::Pool(p) if p.max => "maxpool",
            Op::Pool(_) => "avgpool",
            Op::GlobalAvgPool => "gap",
            Op::BinAct(_) => "binact",
            Op::Flatten => "flatten",
            Op::Dropout(_) => "dropout",
            Op::Linear(_) => "linear",
            Op::DiagLinear(_) => "linear-diag",
            Op::MaskedLinear(l) if l.spec.kind == SparseKind::Rigl => "linear-rigl",
            Op::MaskedLinear(_) => "linear-set",
            Op::Add => "add",
            Op::PatchEmbed(_) => "patch-embed",
            Op::LayerNorm(_) => "layernorm",
            Op::Gelu => "gelu",
            Op::Transpose { .. } => "transpose",
            Op::Attention(_) => "attention",
        }
    }
}

/// One layer in the graph.
#[derive(Clone, Debug)]
pub struct Node {
    /// Name (`block2.pw`).
    pub name: String,
    /// The layer.
    pub op: Op,
    /// Activations read (the second only for `Add`).
    pub inputs: Vec<usize>,
    /// Per-image input shape (of the first input).
    pub in_shape: Shape,
    /// Per-image output shape.
    pub out_shape: Shape,
}

/// Loss and accuracy counts of one step.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct StepStats {
    /// Mean loss over the batch.
    pub loss: f32,
    /// Correct top-1 predictions.
    pub correct: usize,
    /// Images.
    pub n: usize,
}

/// Accumulated per-node time (forward, backward) when profiling is on.
#[derive(Clone, Debug, Default)]
pub struct Profile {
    /// Nanoseconds per node: forward.
    pub forward_ns: Vec<u64>,
    /// Nanoseconds per node: backward.
    pub backward_ns: Vec<u64>,
    /// Steps recorded.
    pub steps: u64,
}

/// Group sparsity of one sparse binarized layer (precisions `sw1`, `sw1a1`).
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize)]
pub struct GroupInfo {
    /// Layer name.
    pub name: String,
    /// Whether its groups are whole depthwise kernels.
    pub depthwise: bool,
    /// Weights per group (the last group of a row may be shorter).
    pub group_len: usize,
    /// Groups.
    pub groups: usize,
    /// Groups pruned to zero.
    pub zero_groups: usize,
    /// Weights.
    pub weights: usize,
    /// Weights in pruned groups.
    pub zero_weights: usize,
}

impl GroupInfo {
    /// Fraction of the layer's weights in pruned groups.
    pub fn sparsity(&self) -> f64 {
        self.zero_weights as f64 / self.weights.max(1) as f64
    }
}

/// A network with its parameters and planned activation memory.
#[derive(Clone, Debug)]
pub struct Model {
    /// The description it was built from.
    pub config: ModelConfig,
    /// Layers in execution order.
    pub nodes: Vec<Node>,
    /// Parameters, gradients, running statistics.
    pub params: ParamStore,
    /// Seed for parameter initialization and dropout masks.
    pub seed: u64,
    /// Incremented every training step (dropout streams derive from it).
    pub step: u64,
    /// Per-node timing, when `Some`.
    pub profile: Option<Profile>,
    /// Images in the last training step (its activations and gradients are still in place for
    /// [`Model::after_step`]).
    last_n: usize,
    shapes: Vec<Shape>,
    /// For each activation, the node that writes its gradient first in backward order (the
    /// last node reading it); later writers add.
    first_writer: Vec<usize>,
    cap: usize,
    acts: Vec<f32>,
    dacts: Vec<f32>,
}

struct Builder {
    quant: QuantConfig,
    convs: usize,
    params: ParamStore,
    nodes: Vec<Node>,
    shapes: Vec<Shape>,
    rng: Rng,
}

impl Builder {
    fn push(&mut self, name: String, op: Op, inputs: Vec<usize>, out: Shape) -> usize {
        let in_shape = self.shapes[inputs[0]];
        self.nodes.push(Node { name, op, inputs, in_shape, out_shape: out });
        self.shapes.push(out);
        self.shapes.len() - 1
    }

    fn conv(
        &mut self,
        name: &str,
        x: usize,
        cout: usize,
        k: usize,
        stride: usize,
        groups: usize,
    ) -> Result<usize, NnError> {
        let s = self.shapes[x];
        let pad = k / 2;
        let g =
            sbdnet_kernels::conv::ConvGeom::new(1, s.h, s.w, s.c, cout, k, stride, pad, groups).ok_or_else(|| {
                NnError::Config(format!(
                    "{name}: a {k}x{k} convolution with {groups} groups does not fit input {s} -> {cout} channels"
                ))
            })?;
        let fan_in = (k * k * s.c / groups) as f32;
        let std = (2.0 / fan_in).sqrt();
        let rng = &mut self.rng;
        let w = self.params.add(format!("{name}.weight"), vec![cout, k, k, s.c / groups], true, || rng.normal() * std);
        let out = Shape { h: g.oh, w: g.ow, c: cout };
        let mut conv = Conv2d::new(s, cout, k, stride, pad, groups, w);
        let first = self.convs == 0;
        self.convs += 1;
        let q = self.quant;
        let mut x = x;
        if q.precision.binary_weights() && (!first || q.binarize_first_last) {
            let mut bin = WeightBinarizer::new(&q, cout, w.len);
            let depthwise = groups > 1 && groups == s.c;
            if q.precision.sparse() {
                if q.group_size == 0 {
                    return Err(NnError::Config("the group size must be at least 1".into()));
                }
                // Depthwise: one group per k x k kernel; otherwise G consecutive input channels
                // of one output channel at one kernel position (see `crate::group`).
                let (layout, shape) = if depthwise {
                    (GroupLayout::new(w.len, k * k, k * k), vec![cout, 1, 1, 1])
                } else {
                    let l = GroupLayout::new(w.len, s.c / groups, q.group_size);
                    (l, vec![cout, k, k, l.per_unit])
                };
                let mask = self.params.add_buffer(format!("{name}.group_mask"), shape, 1.0);
                bin.groups = Some(Groups { layout, mask });
            }
            conv.bin = Some(bin);
            if q.precision.binary_acts() && !(depthwise && q.float_depthwise_input) {
                let t = self.params.add(format!("{name}.act_threshold"), vec![s.c], false, || 0.0);
                x = self.push(format!("{name}.binact"), Op::BinAct(BinAct::new(s.c, t)), vec![x], s);
            }
        }
        Ok(self.push(name.to_string(), Op::Conv(conv), vec![x], out))
    }

    fn bn(&mut self, name: &str, x: usize, act: Act) -> usize {
        let s = self.shapes[x];
        let c = s.c;
        let gamma = self.params.add(format!("{name}.gamma"), vec![c], false, || 1.0);
        let beta = self.params.add(format!("{name}.beta"), vec![c], false, || 0.0);
        let rm = self.params.add_buffer(format!("{name}.running_mean"), vec![c], 0.0);
        let rv = self.params.add_buffer(format!("{name}.running_var"), vec![c], 1.0);
        let mut bn = BatchNorm2d::new(c, gamma, beta, rm, rv);
        bn.relu = act == Act::Relu;
        let y = self.push(name.to_string(), Op::BatchNorm(bn), vec![x], s);
        if act == Act::Hardtanh {
            return self.push(format!("{name}.act"), Op::Hardtanh, vec![y], s);
        }
        y
    }

    /// Whether binary convolutions get real-valued shortcuts ([`QuantConfig::real_shortcut`]).
    fn shortcuts(&self) -> bool {
        self.quant.real_shortcut && self.quant.precision.binary_acts()
    }

    /// `act` after activation `x` (ReLU and Hardtanh as their own nodes).
    fn act(&mut self, name: &str, x: usize, act: Act) -> usize {
        let s = self.shapes[x];
        match act {
            Act::None => x,
            Act::Relu => self.push(format!("{name}.relu"), Op::Relu, vec![x], s),
            Act::Hardtanh => self.push(format!("{name}.act"), Op::Hardtanh, vec![x], s),
        }
    }

    /// Bi-Real-style real-valued shortcut around a binary convolution (+ batch norm): `y + x`
    /// when the shapes agree, `y + avgpool2x2(x)` when the convolution halved an even-sized
    /// input with the same channels, else `y` unchanged. Only with [`Self::shortcuts`].
    fn real_shortcut(&mut self, name: &str, x: usize, y: usize) -> usize {
        if !self.shortcuts() {
            return y;
        }
        let (xs, ys) = (self.shapes[x], self.shapes[y]);
        let short = if xs == ys {
            x
        } else if xs.c == ys.c
            && xs.h.is_multiple_of(2)
            && xs.w.is_multiple_of(2)
            && xs.h / 2 == ys.h
            && xs.w / 2 == ys.w
        {
            self.push(format!("{name}.shortcut_pool"), Op::Pool(Pool::new(xs, 2, 2, false)), vec![x], ys)
        } else {
            return y;
        };
        self.push(format!("{name}.shortcut_add"), Op::Add, vec![y, short], ys)
    }

    fn block(&mut self, name: &str, b: &Block, x: usize, classes_hint: usize) -> Result<usize, NnError> {
        let s = self.shapes[x];
        Ok(match b {
            Block::Conv { out, kernel, stride, act } => {
                let y = self.conv(name, x, *out, *kernel, *stride, 1)?;
                self.bn(&format!("{name}.bn"), y, *act)
            }
            Block::DwSep { out, kernel, stride, act } => {
                let y = self.conv(&format!("{name}.dw"), x, s.c, *kernel, *stride, s.c)?;
                // With binary activations the pointwise input is binarized right after this
                // batch norm: the binarizer is the nonlinearity.
                let inner = if self.quant.precision.binary_acts() { Act::None } else { *act };
                let y = self.bn(&format!("{name}.dw_bn"), y, inner);
                let y = self.real_shortcut(&format!("{name}.dw"), x, y);
                let z = self.conv(&format!("{name}.pw"), y, *out, 1, 1, 1)?;
                if self.shortcuts() {
                    // The block's activation follows the sum, as after a residual addition.
                    let z = self.bn(&format!("{name}.pw_bn"), z, Act::None);
                    let z = self.real_shortcut(&format!("{name}.pw"), y, z);
                    self.act(&format!("{name}.pw_bn"), z, *act)
                } else {
                    self.bn(&format!("{name}.pw_bn"), z, *act)
                }
            }
            Block::MaxPool { k, stride } | Block::AvgPool { k, stride } => {
                if *k == 0 || *stride == 0 || *k > s.h || *k > s.w {
                    return Err(NnError::Config(format!("{name}: pool {k}/{stride} does not fit {s}")));
                }
                let max = matches!(b, Block::MaxPool { .. });
                let p = Pool::new(s, *k, *stride, max);
                let out = Shape { h: (s.h - k) / stride + 1, w: (s.w - k) / stride + 1, c: s.c };
                self.push(name.to_string(), Op::Pool(p), vec![x], out)
            }
            Block::GlobalAvgPool => {
                self.push(name.to_string(), Op::GlobalAvgPool, vec![x], Shape { h: 1, w: 1, c: s.c })
            }
            Block::Flatten => self.push(name.to_string(), Op::Flatten, vec![x], Shape { h: 1, w: 1, c: s.len() }),
            Block::Dropout { p } => {
                if !(0.0..1.0).contains(p) {
                    return Err(NnError::Config(format!("{name}: dropout p must be in [0, 1), got {p}")));
                }
                self.push(name.to_string(), Op::Dropout(Dropout::new(*p)), vec![x], s)
            }
            Block::Linear { out, bias, act, sparse } => {
                let inp = s.len();
                let os = Shape { h: 1, w: 1, c: *out };
                let q = self.quant;
                let binarized = q.precision.binary_weights() && q.binarize_first_last;
                let op = match sparse {
                    Some(spec) => {
                        if binarized {
                            return Err(NnError::Config(format!("{name}: a sparse linear layer cannot be binarized")));
                        }
                        let (p, rng) = (&mut self.params, &mut self.rng);
                        let r = match spec.kind {
                            SparseKind::Diag => {
                                DiagLinear::new(name, inp, *out, *bias, *spec, p, rng).map(Op::DiagLinear)
                            }
                            SparseKind::Set | SparseKind::Rigl => {
                                MaskedLinear::new(name, inp, *out, *bias, *spec, p, rng).map(Op::MaskedLinear)
                            }
                        };
                        r.map_err(|e| NnError::Config(format!("{name}: {e}")))?
                    }
                    None => {
                        let bound = 1.0 / (inp as f32).sqrt();
                        let rng = &mut self.rng;
                        let weight = self.params.add(format!("{name}.weight"), vec![*out, inp], true, || {
                            (rng.uniform() * 2.0 - 1.0) * bound
                        });
                        let rng = &mut self.rng;
                        let bias = bias.then(|| {
                            self.params
                                .add(format!("{name}.bias"), vec![*out], false, || (rng.uniform() * 2.0 - 1.0) * bound)
                        });
                        let _ = classes_hint;
                        let bin = binarized.then(|| WeightBinarizer::new(&q, *out, weight.len));
                        Op::Linear(Linear { inp, out: *out, weight, bias, bin })
                    }
                };
                let y = self.push(name.to_string(), op, vec![x], os);
                match act {
                    Act::None => y,
                    Act::Relu => self.push(format!("{name}.relu"), Op::Relu, vec![y], os),
                    Act::Hardtanh => self.push(format!("{name}.act"), Op::Hardtanh, vec![y], os),
                }
            }
            Block::PatchEmbed { patch, dim } => self.patch_embed(name, x, *patch, *dim)?,
            Block::Transformer { heads, mlp_ratio, sparse } => {
                self.transformer(name, x, *heads, *mlp_ratio, sparse.as_ref())?
            }
            Block::Mixer { token_ratio, channel_ratio, sparse } => {
                self.mixer(name, x, *token_ratio, *channel_ratio, sparse.as_ref())?
            }
            Block::LayerNorm => self.layer_norm(name, x),
            Block::Residual { body, act } => {
                let mut y = x;
                for (j, b) in body.iter().enumerate() {
                    y = self.block(&format!("{name}.{j}"), b, y, classes_hint)?;
                }
                let ys = self.shapes[y];
                let short = if ys == s {
                    x
                } else {
                    let stride = s.h.div_ceil(ys.h.max(1)).max(1);
                    let sc = self.conv(&format!("{name}.shortcut"), x, ys.c, 1, stride, 1)?;
                    let sc_shape = self.shapes[sc];
                    if sc_shape != ys {
                        return Err(NnError::Config(format!("{name}: shortcut gives {sc_shape}, body gives {ys}")));
                    }
                    self.bn(&format!("{name}.shortcut_bn"), sc, Act::None)
                };
                let sum = self.push(format!("{name}.add"), Op::Add, vec![y, short], ys);
                match act {
                    Act::None => sum,
                    Act::Relu => self.push(format!("{name}.relu"), Op::Relu, vec![sum], ys),
                    Act::Hardtanh => self.push(format!("{name}.act"), Op::Hardtanh, vec![sum], ys),
                }
            }
        })
    }
}

/// Rows a linear layer with `inp` input features computes per image of shape `s`: 1 for a
/// layer on the flattened image (`inp == s.len()`), the number of positions for a token-wise
/// layer (`inp == s.c`, vision transformers).
fn rows_per_image(s: Shape, inp: usize) -> usize {
    s.len() / inp.max(1)
}

/// Per image of `rows * cols` values: `y[j][i] = x[i][j]` (or `+=` with `add`).
fn transpose_images(x: &[f32], y: &mut [f32], rows: usize, cols: usize, add: bool) {
    let len = rows * cols;
    for (xi, yi) in x.chunks_exact(len).zip(y.chunks_exact_mut(len)) {
        for (i, xr) in xi.chunks_exact(cols).enumerate() {
            for (j, &v) in xr.iter().enumerate() {
                let o = &mut yi[j * rows + i];
                *o = if add { *o + v } else { v };
            }
        }
    }
}

/// Split a buffer so that activation `out` is mutable and everything before it readable.
fn split(buf: &mut [f32], off: usize, len: usize) -> (&[f32], &mut [f32]) {
    let (lo, hi) = buf.split_at_mut(off);
    (lo, &mut hi[..len])
}

impl Model {
    /// Build a model from its description, initialize parameters from `seed`, and plan
    /// buffers for batches of up to `batch_capacity` images.
    pub fn new(config: ModelConfig, batch_capacity: usize, seed: u64) -> Result<Self, NnError> {
        let [h, w, c] = config.input;
        if h == 0 || w == 0 || c == 0 || config.classes == 0 {
            return Err(NnError::Config("input dimensions and classes must be positive".into()));
        }
        let mut b = Builder {
            quant: config.quant,
            convs: 0,
            params: ParamStore::default(),
            nodes: Vec::new(),
            shapes: vec![Shape { h, w, c }],
            rng: Rng::new(seed),
        };
        let mut x = 0;
        let mut counts = std::collections::HashMap::<&str, usize>::new();
        for blk in &config.blocks {
            let base = match blk {
                Block::Conv { .. } => "conv",
                Block::DwSep { .. } => "block",
                Block::Linear { .. } => "fc",
                Block::Residual { .. } => "res",
                Block::MaxPool { .. } | Block::AvgPool { .. } => "pool",
                Block::GlobalAvgPool => "gap",
                Block::Flatten => "flatten",
                Block::Dropout { .. } => "dropout",
                Block::PatchEmbed { .. } => "embed",
                Block::Transformer { .. } => "blk",
                Block::Mixer { .. } => "mix",
                Block::LayerNorm => "ln",
            };
            let n = counts.entry(base).or_insert(0);
            *n += 1;
            let name = format!("{base}{n}");
            x = b.block(&name, blk, x, config.classes)?;
        }
        let last = b.shapes[x];
        if last.len() != config.classes {
            return Err(NnError::Config(format!(
                "the last block gives {last} values per image, not {} classes",
                config.classes
            )));
        }
        let mut first_writer = vec![usize::MAX; b.shapes.len()];
        for (i, node) in b.nodes.iter().enumerate() {
            for &j in &node.inputs {
                first_writer[j] = i;
            }
        }
        let mut m = Model {
            config,
            nodes: b.nodes,
            params: b.params,
            seed,
            step: 0,
            profile: None,
            last_n: 0,
            first_writer,
            shapes: b.shapes,
            cap: 0,
            acts: Vec::new(),
            dacts: Vec::new(),
        };
        m.plan(batch_capacity.max(1));
        Ok(m)
    }

    /// Offset of activation `j` in the planned buffers.
    fn off(&self, j: usize) -> usize {
        self.cap * self.shapes[..j].iter().map(Shape::len).sum::<usize>()
    }

    /// (Re-)plan every buffer for batches of up to `cap` images. Allocates; call it outside the
    /// step loop.
    pub fn plan(&mut self, cap: usize) {
        self.cap = cap;
        let total: usize = self.shapes.iter().map(Shape::len).sum::<usize>() * cap;
        self.acts = vec![0.0; total];
        self.dacts = vec![0.0; total];
        for node in &mut self.nodes {
            let s = node.in_shape;
            match &mut node.op {
                Op::Conv(c) => c.plan(cap),
                Op::BatchNorm(bn) => bn.plan(cap * s.h * s.w),
                Op::Pool(p) => p.plan(cap),
                Op::Dropout(d) => d.plan(cap * s.len()),
                Op::BinAct(b) => b.plan(cap * s.h * s.w),
                Op::PatchEmbed(e) => e.plan(cap),
                Op::LayerNorm(l) => l.plan(cap * s.h * s.w),
                Op::Attention(a) => a.plan(cap),
                _ => {}
            }
        }
    }

    /// Batch capacity the buffers are planned for.
    pub fn capacity(&self) -> usize {
        self.cap
    }

    /// Per-image input shape.
    pub fn input_shape(&self) -> Shape {
        self.shapes[0]
    }

    /// Bytes of planned activation memory (values and gradients).
    pub fn activation_bytes(&self) -> usize {
        (self.acts.len() + self.dacts.len()) * 4
    }

    fn check_input(&self, x: &[f32], n: usize) -> Result<(), NnError> {
        let il = self.shapes[0].len();
        if n == 0 || n > self.cap {
            return Err(NnError::Input(format!("batch of {n} images; this model is planned for 1..={}", self.cap)));
        }
        if x.len() != n * il {
            return Err(NnError::Input(format!(
                "expected {n} images of {} = {} floats, got {}",
                self.shapes[0],
                n * il,
                x.len()
            )));
        }
        Ok(())
    }

    /// Run the network on `n` images (`x` holds `n * h * w * c` floats, NHWC) and return the
    /// logits `[n][classes]`. `train` selects batch statistics and dropout.
    pub fn forward(&mut self, x: &[f32], n: usize, train: bool) -> Result<&[f32], NnError> {
        self.check_input(x, n)?;
        self.acts[..x.len()].copy_from_slice(x);
        let mut drop_rng = Rng::derive(self.seed, 0xD80, self.step);
        for i in 0..self.nodes.len() {
            let t0 = self.profile.is_some().then(Instant::now);
            let out_off = self.off(i + 1);
            let out_len = n * self.shapes[i + 1].len();
            let in0 = self.nodes[i].inputs[0];
            let (in_off, in_len) = (self.off(in0), n * self.shapes[in0].len());
            let in1 = self.nodes[i].inputs.get(1).map(|&j| (self.off(j), n * self.shapes[j].len()));
            let (lo, y) = split(&mut self.acts, out_off, out_len);
            let x = &lo[in_off..in_off + in_len];
            let node = &mut self.nodes[i];
            let p = &mut self.params;
            match &mut node.op {
                Op::Conv(c) => c.forward(n, x, y, p),
                Op::BatchNorm(bn) => bn.forward(x, y, p, train),
                Op::Relu => ew::relu_forward(x, y),
                Op::Hardtanh => ew::hardtanh_forward(x, y, -1.0, 1.0),
                Op::Pool(pl) => pl.forward(n, x, y),
                Op::GlobalAvgPool => {
                    let s = node.in_shape;
                    kpool::global_avg_forward(x, y, n, s.h * s.w, s.c)
                }
                Op::BinAct(b) => b.forward(x, y, p),
                Op::Flatten => y.copy_from_slice(x),
                Op::Dropout(d) => d.forward(x, y, train, &mut drop_rng),
                Op::Linear(l) => l.forward(n * rows_per_image(node.in_shape, l.inp), x, y, p),
                Op::DiagLinear(l) => l.forward(n * rows_per_image(node.in_shape, l.inp), x, y, p),
                Op::MaskedLinear(l) => l.forward(n * rows_per_image(node.in_shape, l.inp), x, y, p),
                Op::PatchEmbed(e) => e.forward(n, x, y, p),
                Op::LayerNorm(l) => l.forward(x, y, p),
                Op::Gelu => tf::gelu_forward(x, y),
                Op::Attention(a) => a.forward(n, x, y),
                Op::Transpose { rows, cols } => transpose_images(x, y, *rows, *cols, false),
                Op::Add => {
                    let (o1, l1) = in1.expect("add has two inputs");
                    y.copy_from_slice(x);
                    ew::add_assign(y, &lo[o1..o1 + l1]);
                }
            }
            if let (Some(t0), Some(prof)) = (t0, self.profile.as_mut()) {
                prof.forward_ns[i] += t0.elapsed().as_nanos() as u64;
            }
        }
        let last = self.shapes.len() - 1;
        let off = self.off(last);
        Ok(&self.acts[off..off + n * self.shapes[last].len()])
    }

    /// Backward pass for the `n` images of the last training forward, from the logits'
    /// gradient already in place; adds into parameter gradients.
    fn backward(&mut self, n: usize) {
        for i in (0..self.nodes.len()).rev() {
            let t0 = self.profile.is_some().then(Instant::now);
            let out_off = self.off(i + 1);
            let out_len = n * self.shapes[i + 1].len();
            let in0 = self.nodes[i].inputs[0];
            let (in_off, in_len) = (self.off(in0), n * self.shapes[in0].len());
            let mode = |j: usize| match j {
                0 => GradMode::Skip,
                _ if self.first_writer[j] == i => GradMode::Write,
                _ => GradMode::Add,
            };
            let (m0, add0) = (mode(in0), mode(in0).adds());
            let add1 = self.nodes[i].inputs.get(1).is_some_and(|&j| mode(j).adds());
            let (dlo, dy) = self.dacts.split_at_mut(out_off);
            let dy = &dy[..out_len];
            let x = &self.acts[in_off..in_off + in_len];
            let y = &self.acts[out_off..out_off + out_len];
            let node = &mut self.nodes[i];
            let p = &mut self.params;
            if let Op::Add = node.op {
                let in1 = node.inputs[1];
                let (o1, l1) =
                    (self.cap * self.shapes[..in1].iter().map(Shape::len).sum::<usize>(), n * self.shapes[in1].len());
                ew::write_or_add(&mut dlo[in_off..in_off + in_len], dy, add0);
                ew::write_or_add(&mut dlo[o1..o1 + l1], dy, add1);
            } else {
                let dx = &mut dlo[in_off..in_off + in_len];
                match &mut node.op {
                    Op::Conv(c) => c.backward(n, x, dy, dx, p, m0),
                    Op::BatchNorm(bn) => bn.backward(x, dy, dx, p, add0),
                    Op::Relu => ew::relu_backward(y, dy, dx, add0),
                    Op::Hardtanh => ew::hardtanh_backward(x, dy, dx, -1.0, 1.0, add0),
                    Op::Pool(pl) => pl.backward(n, dy, dx, add0),
                    Op::GlobalAvgPool => {
                        let s = node.in_shape;
                        kpool::global_avg_backward(dy, dx, n, s.h * s.w, s.c, add0)
                    }
                    Op::BinAct(b) => b.backward(x, dy, dx, p, add0),
                    Op::Flatten => ew::write_or_add(dx, dy, add0),
                    Op::Dropout(d) => d.backward(dy, dx, true, add0),
                    Op::Linear(l) => l.backward(n * rows_per_image(node.in_shape, l.inp), x, dy, dx, p, add0),
                    Op::DiagLinear(l) => l.backward(n * rows_per_image(node.in_shape, l.inp), x, dy, dx, p, add0),
                    Op::MaskedLinear(l) => l.backward(n * rows_per_image(node.in_shape, l.inp), x, dy, dx, p, add0),
                    Op::PatchEmbed(e) => e.backward(n, dy, dx, p, m0),
                    Op::LayerNorm(l) => l.backward(x, dy, dx, p, add0),
                    Op::Gelu => tf::gelu_backward(x, dy, dx, add0),
                    Op::Attention(a) => a.backward(n, x, dy, dx, add0),
                    Op::Transpose { rows, cols } => transpose_images(dy, dx, *cols, *rows, add0),
                    Op::Add => unreachable!("handled above"),
                }
            }
            if let (Some(t0), Some(prof)) = (t0, self.profile.as_mut()) {
                prof.backward_ns[i] += t0.elapsed().as_nanos() as u64;
            }
        }
    }

    /// Start (`true`) or end (`false`) re-estimating every batch norm's running statistics:
    /// in between, the training-mode forward passes set them to a plain average of their batch
    /// statistics (instead of the exponential average of training). Binary-weight networks need
    /// this before evaluation: their weights' signs flip from step to step at high learning
    /// rates, so the exponential average mixes statistics of many different networks.
    pub fn set_bn_recalibration(&mut self, on: bool) {
        for node in &mut self.nodes {
            if let Op::BatchNorm(bn) = &mut node.op {
                bn.cumulative = on.then_some(0);
            }
        }
    }

    /// Turn per-node timing on (resetting it) or off.
    pub fn set_profiling(&mut self, on: bool) {
        self.profile = on.then(|| Profile {
            forward_ns: vec![0; self.nodes.len()],
            backward_ns: vec![0; self.nodes.len()],
            steps: 0,
        });
    }

    /// Gradient of everything w.r.t. the parameters for one batch: forward (training mode),
    /// loss, backward. Gradients are zeroed first. Returns loss and correct count; the
    /// optimizer step is the caller's.
    pub fn train_step(&mut self, x: &[f32], labels: &[u8], loss: &Loss) -> Result<StepStats, NnError> {
        self.train_step_distilled(x, labels, loss, None)
    }

    /// [`Model::train_step`] with knowledge distillation where `teacher` is given: the
    /// teacher's logits for the same batch (`labels.len() x classes`), the weight of the soft
    /// term and the temperature ([`Loss::distill`]).
    pub fn train_step_distilled(
        &mut self,
        x: &[f32],
        labels: &[u8],
        loss: &Loss,
        teacher: Option<(&[f32], f32, f32)>,
    ) -> Result<StepStats, NnError> {
        let n = labels.len();
        let classes = self.config.classes;
        if let Some(&bad) = labels.iter().find(|&&l| l as usize >= classes) {
            return Err(NnError::Input(format!("label {bad} is out of range for {classes} classes")));
        }
        self.forward(x, n, true)?;
        self.params.zero_grad();
        let last = self.shapes.len() - 1;
        let off = self.off(last);
        let len = n * classes;
        let (z, dz) = (&self.acts[off..off + len], &mut self.dacts[off..off + len]);
        let (loss_v, correct) = match teacher {
            Some((t, a, temp)) => {
                if t.len() != len {
                    return Err(NnError::Input(format!("teacher gave {} logits, the batch needs {len}", t.len())));
                }
                loss.distill(z, t, labels, classes, a, temp, dz)
            }
            None => loss.forward_backward(z, labels, classes, dz),
        };
        self.backward(n);
        self.last_n = n;
        self.step += 1;
        if let Some(p) = self.profile.as_mut() {
            p.steps += 1;
        }
        Ok(StepStats { loss: loss_v, correct, n })
    }

    /// Evaluate on `n` images: mean loss (no smoothing) and correct count, evaluation mode.
    pub fn eval_batch(&mut self, x: &[f32], labels: &[u8]) -> Result<StepStats, NnError> {
        let n = labels.len();
        let classes = self.config.classes;
        let logits = self.forward(x, n, false)?;
        let (loss, correct) = Loss::default().evaluate(logits, labels, classes);
        Ok(StepStats { loss, correct, n })
    }

    /// Dynamic sparse training hook: call it after each optimizer step with the number of
    /// steps done so far (1-based) and the run's total. Sparse layers update their patterns
    /// from the last training batch (see [`crate::sparse`]) and zero `opt`'s state of every
    /// weight they remove or add; dense models are untouched.
    pub fn after_step(&mut self, done: usize, total: usize, opt: &mut Optimizer) {
        let n = self.last_n;
        for i in 0..self.nodes.len() {
            if !matches!(self.nodes[i].op, Op::DiagLinear(_) | Op::MaskedLinear(_)) {
                continue;
            }
            let in0 = self.nodes[i].inputs[0];
            let (xo, xl) = (self.off(in0), n * self.shapes[in0].len());
            let (yo, yl) = (self.off(i + 1), n * self.shapes[i + 1].len());
            let (x, dy) = (&self.acts[xo..xo + xl], &self.dacts[yo..yo + yl]);
            let mut rng = Rng::derive(self.seed, 0x5A_0000 + i as u64, done as u64);
            let p = &mut self.params;
            let in_shape = self.nodes[i].in_shape;
            match &mut self.nodes[i].op {
                Op::DiagLinear(l) => {
                    let rows = n * rows_per_image(in_shape, l.inp);
                    l.after_step(done, total, rows, x, dy, p, opt, &mut rng)
                }
                Op::MaskedLinear(l) => {
                    let rows = n * rows_per_image(in_shape, l.inp);
                    l.after_step(done, total, rows, x, dy, p, opt, &mut rng)
                }
                _ => {}
            }
        }
    }

    /// Counts of every sparse layer (nnz in use now, budget, dense size), in order.
    pub fn sparse_layers(&self) -> Vec<SparseInfo> {
        self.nodes
            .iter()
            .filter_map(|node| match &node.op {
                Op::DiagLinear(l) => Some(l.info(&node.name)),
                Op::MaskedLinear(l) => Some(l.info(&node.name, &self.params)),
                _ => None,
            })
            .collect()
    }

    /// The grouped layers (sparse precisions): node index, weight, groups.
    fn grouped(&self) -> impl Iterator<Item = (usize, crate::params::ParamId, Groups, bool)> + '_ {
        self.nodes.iter().enumerate().filter_map(|(i, node)| match &node.op {
            Op::Conv(c) => c.bin.as_ref().and_then(|b| b.groups).map(|g| {
                let depthwise = c.groups > 1 && c.groups == c.input.c;
                (i, c.weight, g, depthwise)
            }),
            _ => None,
        })
    }

    /// Group sparsity of every sparse binarized layer, in order (empty for other precisions).
    pub fn group_layers(&self) -> Vec<GroupInfo> {
        self.grouped()
            .map(|(i, _, g, depthwise)| {
                let mask = &self.params.buffers[g.mask.range()];
                let mut info = GroupInfo {
                    name: self.nodes[i].name.clone(),
                    depthwise,
                    group_len: g.layout.glen,
                    groups: g.layout.groups(),
                    weights: g.layout.len,
                    ..Default::default()
                };
                for (r, &m) in g.layout.ranges().zip(mask) {
                    if m == 0.0 {
                        info.zero_groups += 1;
                        info.zero_weights += r.len();
                    }
                }
                info
            })
            .collect()
    }

    /// Add `lambda * dR/dW` of the clipped group lasso with weight penalty clipping of every
    /// sparse binarized layer into the gradients (call it after [`Model::train_step`], before
    /// the optimizer step) and return `sum_layers R` (without `lambda`). `r` sets each layer's
    /// threshold `tau = r * mean_g ||W_g||_2`; see [`crate::group`] for the exact rule.
    pub fn group_penalty(&mut self, lambda: f32, r: f32) -> f64 {
        let layers: Vec<_> = self.grouped().map(|(_, w, g, _)| (w, g)).collect();
        let p = &mut self.params;
        let mut total = 0.0;
        for (w, g) in layers {
            let mask = &p.buffers[g.mask.range()];
            let s = group::penalty(&p.data[w.range()], &g.layout, mask, r, lambda, &mut p.grad[w.range()]);
            total += s.value;
        }
        total
    }

    /// Fade groups below the clipping threshold in the forward pass of every sparse binarized
    /// layer (`Some(r)`, the lasso's ratio) or stop fading (`None`); see
    /// [`crate::group::fade`].
    pub fn set_group_fade(&mut self, ratio: Option<f32>) {
        for node in &mut self.nodes {
            if let Op::Conv(c) = &mut node.op {
                if let Some(b) = c.bin.as_mut().filter(|b| b.groups.is_some()) {
                    b.fade = ratio;
                }
            }
        }
    }

    /// The fraction of groups to prune in every pointwise (and ordinary) sparse layer so that
    /// a fraction `total` of all grouped weights is zero when the depthwise layers are pruned
    /// at `dw_fraction` (`total` itself when there is no depthwise layer). Not clamped: a value
    /// of 1 or more means the target cannot be met without silencing every pointwise layer
    /// ([`Model::prune_groups`] clamps it to `[0, 1]`; the trainer refuses such targets).
    pub fn pointwise_fraction(&self, total: f64, dw_fraction: f64) -> f64 {
        let (mut dw, mut other) = (0usize, 0usize);
        for (_, _, g, d) in self.grouped() {
            *(if d { &mut dw } else { &mut other }) += g.layout.len;
        }
        if other == 0 {
            return total;
        }
        (total * (dw + other) as f64 - dw_fraction * dw as f64) / other as f64
    }

    /// Prune groups to exact zero so that a fraction `total` of all grouped weights is zero:
    /// depthwise layers (whose groups are whole kernels) lose a fraction `dw_fraction` of their
    /// groups, every other sparse layer the same fraction of its groups, chosen by
    /// [`Model::pointwise_fraction`]; in each layer the weakest groups by root mean square of
    /// the latent weights go first. When `eps > 0`, every group whose root mean square is
    /// below `eps` goes too. Groups never come back. The weights of pruned groups and their
    /// optimizer state (`opt`: momentum, Adam moments) are zeroed. Returns the groups pruned
    /// by this call.
    pub fn prune_groups(&mut self, total: f64, dw_fraction: f64, eps: f32, opt: Option<&mut Optimizer>) -> usize {
        let fraction = self.pointwise_fraction(total, dw_fraction).clamp(0.0, 1.0);
        let layers: Vec<_> = self.grouped().map(|(_, w, g, dw)| (w, g, dw)).collect();
        let p = &mut self.params;
        let mut pruned = 0;
        for &(w, g, dw) in &layers {
            let f = if dw { dw_fraction } else { fraction };
            let target = (f.clamp(0.0, 1.0) * g.layout.groups() as f64).round() as usize;
            let mask = &mut p.buffers[g.mask.range()];
            pruned += group::prune_to(&p.data[w.range()], &g.layout, mask, target).len();
            if eps > 0.0 {
                pruned += group::prune_below(&p.data[w.range()], &g.layout, mask, eps).len();
            }
        }
        self.apply_group_masks(opt);
        pruned
    }

    /// Zero the weights, gradients and optimizer state (`opt`) of every pruned group, e.g.
    /// after loading weights from elsewhere. Training keeps them zero by itself: pruned
    /// weights get no gradient, so with zero optimizer state they never move.
    pub fn apply_group_masks(&mut self, mut opt: Option<&mut Optimizer>) {
        let layers: Vec<_> = self.grouped().map(|(_, w, g, _)| (w, g)).collect();
        let p = &mut self.params;
        for (w, g) in layers {
            let mask = &p.buffers[g.mask.range()];
            group::apply_mask(&mut p.data[w.range()], &g.layout, mask);
            group::apply_mask(&mut p.grad[w.range()], &g.layout, mask);
            if let Some(o) = opt.as_deref_mut() {
                group::apply_mask(&mut o.m[w.range()], &g.layout, mask);
                if !o.v.is_empty() {
                    group::apply_mask(&mut o.v[w.range()], &g.layout, mask);
                }
            }
        }
    }

    /// Rebuild the sparse layers' patterns from their buffers (offsets, masks): needed after
    /// parameters and buffers were overwritten, e.g. by a checkpoint (which does it).
    pub fn sync_sparse(&mut self) -> Result<(), NnError> {
        for node in &mut self.nodes {
            if let Op::DiagLinear(l) = &mut node.op {
                l.sync(&self.params).map_err(|e| NnError::Config(format!("{}: {e}", node.name)))?;
            }
        }
        Ok(())
    }
}

/// Vision-transformer blocks (see [`crate::transformer`]).
impl Builder {
    fn patch_embed(&mut self, name: &str, x: usize, patch: usize, dim: usize) -> Result<usize, NnError> {
        let s = self.shapes[x];
        if patch == 0 || dim == 0 || !s.h.is_multiple_of(patch) || !s.w.is_multiple_of(patch) {
            return Err(NnError::Config(format!("{name}: patch {patch} does not tile input {s} (or dim {dim} is 0)")));
        }
        let pl = patch * patch * s.c;
        let bound = 1.0 / (pl as f32).sqrt();
        let rng = &mut self.rng;
        let weight =
            self.params.add(format!("{name}.weight"), vec![dim, pl], true, || (rng.uniform() * 2.0 - 1.0) * bound);
        let rng = &mut self.rng;
        let bias = self.params.add(format!("{name}.bias"), vec![dim], false, || (rng.uniform() * 2.0 - 1.0) * bound);
        let t = (s.h / patch) * (s.w / patch);
        let rng = &mut self.rng;
        let pos = self.params.add(format!("{name}.pos"), vec![t, dim], false, || rng.normal() * 0.02);
        let out = Shape { h: s.h / patch, w: s.w / patch, c: dim };
        let op = Op::PatchEmbed(PatchEmbed::new(s, patch, dim, weight, bias, pos));
        Ok(self.push(name.to_string(), op, vec![x], out))
    }

    fn layer_norm(&mut self, name: &str, x: usize) -> usize {
        let s = self.shapes[x];
        let gamma = self.params.add(format!("{name}.gamma"), vec![s.c], false, || 1.0);
        let beta = self.params.add(format!("{name}.beta"), vec![s.c], false, || 0.0);
        self.push(name.to_string(), Op::LayerNorm(LayerNorm::new(s.c, gamma, beta)), vec![x], s)
    }

    /// A token-wise linear layer `s.c -> out` with bias, dense or `sparse`.
    fn token_linear(
        &mut self,
        name: &str,
        x: usize,
        out: usize,
        sparse: Option<&SparseSpec>,
    ) -> Result<usize, NnError> {
        let s = self.shapes[x];
        let inp = s.c;
        let (p, rng) = (&mut self.params, &mut self.rng);
        let op = match sparse {
            Some(spec) => match spec.kind {
                SparseKind::Diag => DiagLinear::new(name, inp, out, true, *spec, p, rng).map(Op::DiagLinear),
                SparseKind::Set | SparseKind::Rigl => {
                    MaskedLinear::new(name, inp, out, true, *spec, p, rng).map(Op::MaskedLinear)
                }
            }
            .map_err(|e| NnError::Config(format!("{name}: {e}")))?,
            None => {
                let bound = 1.0 / (inp as f32).sqrt();
                let weight =
                    p.add(format!("{name}.weight"), vec![out, inp], true, || (rng.uniform() * 2.0 - 1.0) * bound);
                let bias = p.add(format!("{name}.bias"), vec![out], false, || (rng.uniform() * 2.0 - 1.0) * bound);
                Op::Linear(Linear { inp, out, weight, bias: Some(bias), bin: None })
            }
        };
        Ok(self.push(name.to_string(), op, vec![x], Shape { c: out, ..s }))
    }

    fn mixer(
        &mut self,
        name: &str,
        x: usize,
        token_ratio: f32,
        channel_ratio: f32,
        sparse: Option<&SparseSpec>,
    ) -> Result<usize, NnError> {
        let s = self.shapes[x];
        let tokens = s.h * s.w;
        let th = (token_ratio * tokens as f32).round() as usize;
        let ch = (channel_ratio * s.c as f32).round() as usize;
        if th == 0 || ch == 0 || !token_ratio.is_finite() || !channel_ratio.is_finite() {
            return Err(NnError::Config(format!(
                "{name}: the token ({token_ratio}) and channel ({channel_ratio}) MLP ratios must be positive"
            )));
        }
        // Channels x tokens: the token-mixing layers run on rows of `tokens` values.
        let ts = Shape { h: 1, w: s.c, c: tokens };
        let h = self.layer_norm(&format!("{name}.ln1"), x);
        let t = self.push(format!("{name}.tokens.t"), Op::Transpose { rows: tokens, cols: s.c }, vec![h], ts);
        let t = self.token_linear(&format!("{name}.tokens.fc1"), t, th, sparse)?;
        let t = self.push(format!("{name}.tokens.gelu"), Op::Gelu, vec![t], self.shapes[t]);
        let t = self.token_linear(&format!("{name}.tokens.fc2"), t, tokens, sparse)?;
        let t = self.push(format!("{name}.tokens.tt"), Op::Transpose { rows: s.c, cols: tokens }, vec![t], s);
        let x1 = self.push(format!("{name}.add1"), Op::Add, vec![t, x], s);
        let h = self.layer_norm(&format!("{name}.ln2"), x1);
        let f = self.token_linear(&format!("{name}.channels.fc1"), h, ch, sparse)?;
        let f = self.push(format!("{name}.channels.gelu"), Op::Gelu, vec![f], self.shapes[f]);
        let f = self.token_linear(&format!("{name}.channels.fc2"), f, s.c, sparse)?;
        Ok(self.push(format!("{name}.add2"), Op::Add, vec![f, x1], s))
    }

    fn transformer(
        &mut self,
        name: &str,
        x: usize,
        heads: usize,
        mlp_ratio: f32,
        sparse: Option<&SparseSpec>,
    ) -> Result<usize, NnError> {
        let s = self.shapes[x];
        let hidden = (mlp_ratio * s.c as f32).round() as usize;
        if heads == 0 || !s.c.is_multiple_of(heads) || hidden == 0 || !mlp_ratio.is_finite() {
            return Err(NnError::Config(format!(
                "{name}: width {} must be a multiple of the heads ({heads}) and the MLP ratio ({mlp_ratio}) positive",
                s.c
            )));
        }
        let h = self.layer_norm(&format!("{name}.ln1"), x);
        let qkv = self.token_linear(&format!("{name}.attn.qkv"), h, 3 * s.c, sparse)?;
        let att = Op::Attention(Attention::new(s.h * s.w, s.c, heads));
        let a = self.push(format!("{name}.attn"), att, vec![qkv], s);
        let a = self.token_linear(&format!("{name}.attn.proj"), a, s.c, sparse)?;
        let x1 = self.push(format!("{name}.add1"), Op::Add, vec![a, x], s);
        let h = self.layer_norm(&format!("{name}.ln2"), x1);
        let f = self.token_linear(&format!("{name}.mlp.fc1"), h, hidden, sparse)?;
        let f = self.push(format!("{name}.mlp.gelu"), Op::Gelu, vec![f], self.shapes[f]);
        let f = self.token_linear(&format!("{name}.mlp.fc2"), f, s.c, sparse)?;
        Ok(self.push(format!("{name}.add2"), Op::Add, vec![f, x1], s))
    }
}

//! Per-layer cost of a model in its deployed form, in the manner of Larq's model summary.
//!
//! Counts are per image. Rules (the deployed form folds what training keeps separate):
//! - float convolution / linear: every multiply-accumulate (MAC) is one multiplication and one
//!   addition; weights take 32 bits;
//! - binary-weight convolution (`w1`): `Wb = alpha * sign(W)`, so each MAC is an addition or a
//!   subtraction of the input and `alpha` folds into the next batch norm's per-channel affine:
//!   0 multiplications, MACs additions; weights take 1 bit plus 32 bits per `alpha`;
//! - binary weights and activations (`w1a1`): each MAC is one XNOR + popcount step, counted as
//!   an addition (and in `binary_ops`), no multiplications;
//! - batch norm: a per-channel affine (one multiplication and one addition per output value,
//!   64 bits per channel); when a binary activation follows, batch norm, `alpha` and the sign
//!   fold into one threshold comparison per value (no arithmetic, 32 bits per channel), and the
//!   binary activation itself is free;
//! - global average pooling: one addition per input value and one multiplication per channel;
//!   average pooling likewise; max pooling, ReLU, Hardtanh: comparisons only;
//! - sparse binary weights (`sw1`, `sw1a1`; see [`crate::group`]): the packed sparse form
//!   stores one sign bit per surviving weight, one mask bit per group and 32 bits per `alpha`;
//!   a pruned group removes its `out_h * out_w * |g|` additions (`additions_removed`), and
//!   `sparsity` is the fraction of the layer's weights in pruned groups (`zero_groups`
//!   groups); with binary activations, `binary_ops` likewise counts only the surviving
//!   weights. Under `total`, `sparsity` is over the weights of all grouped layers;
//! - sparse linear layers (DynaDiag, SET, RigL): only the deployed non-zeros count, the budget
//!   `K * D` (DynaDiag's soft phase trains up to `C * D` candidates, but the deployed layer
//!   keeps `K` diagonals), as parameters, MACs, multiplications and additions (plus the bias).

use crate::model::{Model, Op};
use serde::Serialize;

/// Cost of one layer per image.
#[derive(Clone, Debug, Default, Serialize, PartialEq)]
pub struct LayerSummary {
    /// Layer name.
    pub name: String,
    /// Layer kind (`conv-dw`, `bn+relu`, ...), with `/w1` or `/w1a1` for binarized layers.
    pub kind: String,
    /// Output shape `HxWxC`.
    pub output: String,
    /// Trainable parameters.
    pub params: usize,
    /// Bits of the deployed parameters.
    pub param_bits: usize,
    /// Bytes of the parameters in float.
    pub memory_float_bytes: usize,
    /// Bytes of the deployed (packed) parameters.
    pub memory_packed_bytes: usize,
    /// Multiply-accumulates (convolution and linear layers).
    pub macs: usize,
    /// Multiplications in the deployed form.
    pub multiplications: usize,
    /// Additions and subtractions in the deployed form.
    pub additions: usize,
    /// XNOR + popcount steps (binary-activation layers).
    pub binary_ops: usize,
    /// Weight groups (sparse binary layers; 0 elsewhere).
    pub groups: usize,
    /// Groups pruned to zero.
    pub zero_groups: usize,
    /// Fraction of the weights in pruned groups.
    pub sparsity: f64,
    /// Additions the pruned groups remove (already subtracted from `additions`).
    pub additions_removed: usize,
}

/// Whole-model summary.
#[derive(Clone, Debug, Serialize)]
pub struct Summary {
    /// Per layer.
    pub layers: Vec<LayerSummary>,
    /// Sums over layers (`name` is "total").
    pub total: LayerSummary,
    /// Float parameter bits over deployed parameter bits.
    pub compression: f64,
}

/// Summarize `model` (see the module documentation for the counting rules).
pub fn summarize(model: &Model) -> Summary {
    let nodes = &model.nodes;
    let grouped = model.group_layers();
    let (mut grouped_weights, mut zero_weights) = (0usize, 0usize);
    let mut layers = Vec::new();
    for (i, node) in nodes.iter().enumerate() {
        let out = node.out_shape;
        let out_len = out.len();
        let next_is_binact = nodes.get(i + 1).is_some_and(|n| matches!(n.op, Op::BinAct(_)) && n.inputs[0] == i + 1);
        let mut l = LayerSummary {
            name: node.name.clone(),
            kind: node.op.kind().to_string(),
            output: out.to_string(),
            ..Default::default()
        };
        match &node.op {
            Op::Conv(c) => {
                let params = c.weight.len;
                let macs = out.h * out.w * c.cout * c.k * c.k * (c.input.c / c.groups);
                l.params = params;
                l.macs = macs;
                match &c.bin {
                    Some(b) => {
                        let binary_in = i > 0 && matches!(nodes[i - 1].op, Op::BinAct(_)) && node.inputs[0] == i;
                        let alphas = if b.per_channel { c.cout } else { 1 };
                        l.param_bits = params + 32 * alphas;
                        l.additions = macs;
                        l.kind += if binary_in { "/w1a1" } else { "/w1" };
                        if let Some(g) = grouped.iter().find(|g| g.name == node.name) {
                            l.kind.insert(l.kind.len() - if binary_in { 4 } else { 2 }, 's');
                            l.groups = g.groups;
                            l.zero_groups = g.zero_groups;
                            l.sparsity = g.sparsity();
                            l.param_bits = params - g.zero_weights + g.groups + 32 * alphas;
                            l.additions_removed = out.h * out.w * g.zero_weights;
                            l.additions = macs - l.additions_removed;
                            grouped_weights += g.weights;
                            zero_weights += g.zero_weights;
                        }
                        if binary_in {
                            l.binary_ops = l.additions;
                        }
                    }
                    None => {
                        l.param_bits = 32 * params;
                        l.multiplications = macs;
                        l.additions = macs;
                    }
                }
            }
            Op::Linear(lin) => {
                let params = lin.weight.len + lin.bias.map_or(0, |b| b.len);
                // Per position for token-wise layers (vision transformers).
                let macs = lin.inp * lin.out * (node.in_shape.len() / lin.inp.max(1));
                l.params = params;
                l.macs = macs;
                let bias = lin.bias.map_or(0, |b| b.len);
                match &lin.bin {
                    Some(b) => {
                        let alphas = if b.per_channel { lin.out } else { 1 };
                        l.param_bits = lin.weight.len + 32 * (alphas + bias);
                        l.additions = macs + bias;
                        l.kind += "/w1";
                    }
                    None => {
                        l.param_bits = 32 * params;
                        l.multiplications = macs;
                        l.additions = macs + bias;
                    }
                }
            }
            Op::DiagLinear(_) | Op::MaskedLinear(_) => {
                // Deployed form: only the non-zeros (diagonal values or CSR entries) and the bias.
                let info = match &node.op {
                    Op::DiagLinear(d) => (d.info(&node.name), d.bias),
                    Op::MaskedLinear(m) => (m.info(&node.name, &model.params), m.bias),
                    _ => unreachable!("matched above"),
                };
                let (nnz, bias) = (info.0.target_nnz, info.1.map_or(0, |b| b.len));
                let rows = node.out_shape.h * node.out_shape.w;
                l.params = nnz + bias;
                l.macs = nnz * rows;
                l.param_bits = 32 * l.params;
                l.multiplications = nnz * rows;
                l.additions = (nnz + bias) * rows;
            }
            Op::BatchNorm(bn) => {
                l.params = 2 * bn.c;
                if next_is_binact {
                    l.param_bits = 32 * bn.c;
                    l.kind += " (folded to threshold)";
                } else {
                    l.param_bits = 64 * bn.c;
                    l.multiplications = out_len;
                    l.additions = out_len;
                }
            }
            Op::BinAct(b) => {
                l.params = b.c;
                l.kind += " (folded)";
            }
            Op::GlobalAvgPool => {
                l.additions = node.in_shape.len();
                l.multiplications = out.c;
            }
            Op::Pool(p) if !p.max => {
                l.additions = out_len * p.k * p.k;
                l.multiplications = out_len;
            }
            Op::Add => l.additions = out_len,
            Op::PatchEmbed(e) => {
                l.params = e.weight.len + e.bias.len + e.pos.len;
                l.param_bits = 32 * l.params;
                l.macs = e.tokens() * e.dim * e.patch_len();
                l.multiplications = l.macs;
                l.additions = l.macs + 2 * out_len;
            }
            Op::LayerNorm(ln) => {
                l.params = 2 * ln.c;
                l.param_bits = 64 * ln.c;
                l.multiplications = 2 * out_len;
                l.additions = 3 * out_len;
            }
            Op::Attention(a) => {
                // Q K^T and P V: 2 T^2 dim multiply-adds per image.
                l.macs = 2 * a.tokens * a.tokens * a.dim;
                l.multiplications = l.macs;
                l.additions = l.macs;
            }
            _ => {}
        }
        l.memory_float_bytes = 4 * l.params;
        l.memory_packed_bytes = l.param_bits.div_ceil(8);
        layers.push(l);
    }
    let mut total = LayerSummary { name: "total".into(), ..Default::default() };
    for l in &layers {
        total.params += l.params;
        total.param_bits += l.param_bits;
        total.memory_float_bytes += l.memory_float_bytes;
        total.memory_packed_bytes += l.memory_packed_bytes;
        total.macs += l.macs;
        total.multiplications += l.multiplications;
        total.additions += l.additions;
        total.binary_ops += l.binary_ops;
        total.groups += l.groups;
        total.zero_groups += l.zero_groups;
        total.additions_removed += l.additions_removed;
    }
    total.sparsity = zero_weights as f64 / grouped_weights.max(1) as f64;
    let compression = (32 * total.params) as f64 / total.param_bits.max(1) as f64;
    Summary { layers, total, compression }
}

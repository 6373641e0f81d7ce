//! `sbdnet export`: a trained checkpoint to a deployed `.sbd` model (or a float ONNX model).
//!
//! Folding rules (the runtime executes exactly these):
//! - A convolution's output stage absorbs the BatchNorm that follows it (eval form: running
//!   statistics), the binary weights' `alpha`, a following ReLU / Hardtanh, and a following
//!   binary activation:
//!   - to `f32`: `act(scale[c] * s + bias[c])` with `scale = gamma / sqrt(var + eps) * alpha[c]`,
//!     `bias = beta - mean * gamma / sqrt(var + eps)`;
//!   - to bits from a binary layer on bits: one integer threshold per channel
//!     ([`sbdnet_kernels::binary::fold_bn_sign`], which derives the `gamma < 0` and
//!     `gamma = 0` cases), after moving the activation into the threshold: `relu(y) > t` is
//!     `y > t` for `t >= 0` and always true for `t < 0`; `hardtanh(y) > t` is `y > t` for
//!     `-1 <= t < 1`, always true for `t < -1`, never for `t >= 1`;
//!   - to bits from a float input (the first convolution): `act(scale * s + bias) > t`.
//! - Binary weights are packed by sign (`sign(0) = +1`, as in training).
//! - Dropout disappears; other layers map one to one.

use anyhow::{bail, Context, Result};
use sbdnet_kernels::binary::{self, fold_bn_sign, SignThreshold};
use sbdnet_kernels::conv::ConvGeom;
use sbdnet_nn::model::{Node, Op};
use sbdnet_nn::Model;
use sbdnet_runtime::graph::{Act, Conv, Graph, Layer, Op as ROp, Output, TensorData, Tensors, Weights};
use sbdnet_runtime::DeployedModel;

/// The activation applied before a binarization, moved into its threshold: the effective
/// threshold on the pre-activation, or a constant output (`Err(true)` = always `+1`).
fn act_into_threshold(act: Act, t: f32) -> std::result::Result<f32, bool> {
    match act {
        Act::None => Ok(t),
        Act::Relu if t < 0.0 => Err(true),
        Act::Relu => Ok(t),
        Act::Hardtanh if t < -1.0 => Err(true),
        Act::Hardtanh if t >= 1.0 => Err(false),
        Act::Hardtanh => Ok(t),
    }
}

/// A BatchNorm's gamma, beta, running mean and sigma = sqrt(var + eps).
struct Bn {
    gamma: Vec<f32>,
    beta: Vec<f32>,
    mean: Vec<f32>,
    sigma: Vec<f32>,
}

impl Bn {
    /// Channel `c`'s affine as the training graph's eval computes it:
    /// `scale = gamma * rstd`, `shift = beta - mean * scale`.
    fn affine(&self, c: usize) -> (f32, f32) {
        let s = self.gamma[c] * (1.0 / self.sigma[c]);
        (s, self.beta[c] - self.mean[c] * s)
    }
}

struct Exporter<'a> {
    model: &'a Model,
    tensors: Tensors,
    layers: Vec<Layer>,
    /// Training activation index -> deployed value index.
    map: Vec<Option<usize>>,
    /// Readers of each training activation.
    readers: Vec<usize>,
    /// Deployed values that are packed bits.
    bits: Vec<bool>,
}

impl Exporter<'_> {
    fn param(&self, name: &str) -> Result<&[f32]> {
        self.model.params.find(name).with_context(|| format!("the model has no tensor {name}"))
    }

    /// The BatchNorm layer `name`'s parameters and running statistics.
    fn bn(&self, name: &str, eps: f32) -> Result<Bn> {
        let var = self.param(&format!("{name}.running_var"))?;
        Ok(Bn {
            gamma: self.param(&format!("{name}.gamma"))?.to_vec(),
            beta: self.param(&format!("{name}.beta"))?.to_vec(),
            mean: self.param(&format!("{name}.running_mean"))?.to_vec(),
            sigma: var.iter().map(|v| (v + eps).sqrt()).collect(),
        })
    }

    fn put(&mut self, name: String, d: TensorData) -> String {
        self.tensors.insert(name.clone(), d);
        name
    }

    /// The node after `j` if it reads only activation `j + 1` and is that activation's only
    /// reader.
    fn sole_next(&self, j: usize) -> Option<&Node> {
        let n = self.model.nodes.get(j + 1)?;
        (n.inputs == [j + 1] && self.readers[j + 1] == 1).then_some(n)
    }

    fn input_of(&self, node: &Node, k: usize) -> Result<usize> {
        self.map[node.inputs[k]].with_context(|| format!("{}: its input was not exported", node.name))
    }

    fn push(&mut self, name: &str, inputs: Vec<usize>, op: ROp, bits: bool, last_act: usize) {
        self.layers.push(Layer { name: name.to_string(), inputs, op });
        self.bits.push(bits);
        self.map[last_act] = Some(self.layers.len());
    }

    /// Export the convolution at node `i` with everything its output stage absorbs; returns
    /// the last node consumed.
    fn conv(&mut self, i: usize) -> Result<usize> {
        let node = &self.model.nodes[i];
        let Op::Conv(cv) = &node.op else { unreachable!() };
        let name = node.name.clone();
        let input = self.input_of(node, 0)?;
        let bits_in = self.bits[input];
        let (cin, cout) = (cv.input.c, cv.cout);
        let latent = &self.model.params.data[cv.weight.range()];
        let g = ConvGeom::new(1, cv.input.h, cv.input.w, cin, cout, cv.k, cv.stride, cv.pad, cv.groups)
            .with_context(|| format!("{name}: bad geometry"))?;
        if cv.groups != 1 && cv.groups != cin {
            bail!("{name}: grouped convolutions other than depthwise are not exported");
        }
        let (weights, alpha) = match &cv.bin {
            Some(b) => {
                let mut b = b.clone();
                b.binarize(latent, &self.model.params.buffers);
                let depthwise = cv.groups > 1;
                let mut packed =
                    vec![0u64; if depthwise { binary::dw_weight_words(&g) } else { binary::conv_weight_words(&g) }];
                if depthwise {
                    binary::pack_depthwise_weights(&g, latent, &mut packed);
                } else {
                    binary::pack_conv_weights(&g, latent, &mut packed);
                }
                let bits = self.put(format!("{name}.bits"), TensorData::U64(packed));
                // A sparse layer's group mask, one byte per group, as the checkpoint orders it.
                let (mask, group_size) = match &b.groups {
                    Some(g) => {
                        let m: Vec<u8> =
                            self.model.params.buffers[g.mask.range()].iter().map(|&v| u8::from(v != 0.0)).collect();
                        let gs = (!depthwise).then(|| self.model.config.quant.group_size.min(cin));
                        (Some(self.put(format!("{name}.mask"), TensorData::U8(m))), gs)
                    }
                    None => (None, None),
                };
                (Weights::Binary { bits, mask, group_size }, b.alpha.clone())
            }
            None => {
                if bits_in {
                    bail!("{name}: a float convolution reads binary activations");
                }
                let tensor = self.put(format!("{name}.weight"), TensorData::F32(latent.to_vec()));
                (Weights::Float { tensor }, vec![1.0; cout])
            }
        };
        // BatchNorm, activation, binarization that follow.
        let mut j = i;
        let (mut scale, mut bias) = (alpha.clone(), vec![0.0f32; cout]);
        let mut bn_parts: Option<Bn> = None;
        let mut act = Act::None;
        if let Some(Op::BatchNorm(bn)) = self.sole_next(j).map(|n| &n.op) {
            let parts = self.bn(&self.model.nodes[j + 1].name, bn.eps)?;
            for c in 0..cout {
                let (s, shift) = parts.affine(c);
                scale[c] = s * alpha[c];
                bias[c] = shift;
            }
            if bn.relu {
                act = Act::Relu;
            }
            bn_parts = Some(parts);
            j += 1;
        }
        if act == Act::None {
            match self.sole_next(j).map(|n| &n.op) {
                Some(Op::Relu) => {
                    act = Act::Relu;
                    j += 1;
                }
                Some(Op::Hardtanh) => {
                    act = Act::Hardtanh;
                    j += 1;
                }
                _ => {}
            }
        }
        let mut thresholds = None;
        if let Some(Op::BinAct(b)) = self.sole_next(j).map(|n| &n.op) {
            thresholds = Some(self.model.params.data[b.threshold.range()].to_vec());
            j += 1;
        }
        let output = match thresholds {
            Some(t) if cv.bin.is_some() && bits_in => {
                let (mut thr, mut flip) = (vec![0i32; cout], vec![0u8; cout]);
                for c in 0..cout {
                    let st = match act_into_threshold(act, t[c]) {
                        Err(always) => SignThreshold { thr: if always { i32::MIN } else { i32::MAX }, negative: false },
                        Ok(te) => match &bn_parts {
                            Some(b) => fold_bn_sign(alpha[c], b.gamma[c], b.beta[c], b.mean[c], b.sigma[c], te),
                            None => fold_bn_sign(alpha[c], 1.0, 0.0, 0.0, 1.0, te),
                        },
                    };
                    thr[c] = st.thr;
                    flip[c] = st.negative as u8;
                }
                let thr = self.put(format!("{name}.thr"), TensorData::I32(thr));
                let flip = self.put(format!("{name}.flip"), TensorData::U8(flip));
                Output::Threshold { thr, flip }
            }
            Some(t) => {
                let scale = self.put(format!("{name}.scale"), TensorData::F32(scale));
                let bias = self.put(format!("{name}.bias"), TensorData::F32(bias));
                let t = self.put(format!("{name}.t"), TensorData::F32(t));
                Output::Sign { scale, bias, act, t }
            }
            None => {
                let scale = self.put(format!("{name}.scale"), TensorData::F32(scale));
                let bias = self.put(format!("{name}.bias"), TensorData::F32(bias));
                Output::Affine { scale, bias, act }
            }
        };
        let bits_out = output.is_bits();
        let conv = Conv { cin, cout, k: cv.k, stride: cv.stride, pad: cv.pad, groups: cv.groups, weights, output };
        self.push(&name, vec![input], ROp::Conv(conv), bits_out, j + 1);
        Ok(j)
    }

    fn node(&mut self, i: usize) -> Result<usize> {
        let node = &self.model.nodes[i];
        let name = node.name.clone();
        let c = node.in_shape.c;
        let op = match &node.op {
            Op::Conv(_) => return self.conv(i),
            Op::Dropout(_) => {
                self.map[i + 1] = self.map[node.inputs[0]];
                return Ok(i);
            }
            Op::BatchNorm(bn) => {
                let parts = self.bn(&name, bn.eps)?;
                let (scale, bias): (Vec<f32>, Vec<f32>) = (0..c).map(|k| parts.affine(k)).unzip();
                let act = if bn.relu { Act::Relu } else { Act::None };
                let scale = self.put(format!("{name}.scale"), TensorData::F32(scale));
                let bias = self.put(format!("{name}.bias"), TensorData::F32(bias));
                ROp::Affine { scale, bias, act }
            }
            Op::Relu => ROp::Activation { act: Act::Relu },
            Op::Hardtanh => ROp::Activation { act: Act::Hardtanh },
            Op::Pool(p) => ROp::Pool { k: p.k, stride: p.stride, max: p.max },
            Op::GlobalAvgPool => ROp::GlobalAvgPool,
            Op::Flatten => ROp::Flatten,
            Op::Add => ROp::Add,
            Op::BinAct(b) => {
                let t = self.model.params.data[b.threshold.range()].to_vec();
                ROp::Binarize { t: self.put(format!("{name}.t"), TensorData::F32(t)) }
            }
            Op::Linear(l) => {
                if l.bin.is_some() {
                    bail!("{name}: binarized classifiers are not exported yet (train without --binarize-first-last)");
                }
                let w = self.model.params.data[l.weight.range()].to_vec();
                let weight = self.put(format!("{name}.weight"), TensorData::F32(w));
                let bias = match l.bias {
                    Some(b) => {
                        let b = self.model.params.data[b.range()].to_vec();
                        Some(self.put(format!("{name}.bias"), TensorData::F32(b)))
                    }
                    None => None,
                };
                ROp::Linear { inp: l.inp, out: l.out, weight, bias }
            }
            Op::DiagLinear(_) | Op::MaskedLinear(_) => {
                bail!("{name}: sparse linear layers (--linear diag|set|rigl) are not exported yet")
            }
            _ => bail!("{name}: {} layers (vit-tiny, mixer-tiny) are not exported to .sbd yet", node.op.kind()),
        };
        let inputs = (0..node.inputs.len()).map(|k| self.input_of(node, k)).collect::<Result<Vec<_>>>()?;
        let bits = matches!(op, ROp::Binarize { .. });
        self.push(&name, inputs, op, bits, i + 1);
        Ok(i)
    }
}

/// Build the deployed model of a trained (eval-mode) model.
pub fn deploy(model: &Model, mean: &[f32], std: &[f32]) -> Result<DeployedModel> {
    let nodes = &model.nodes;
    let mut readers = vec![0usize; nodes.len() + 1];
    for n in nodes {
        for &a in &n.inputs {
            readers[a] += 1;
        }
    }
    let mut map = vec![None; nodes.len() + 1];
    map[0] = Some(0);
    let mut ex = Exporter { model, tensors: Tensors::new(), layers: Vec::new(), map, readers, bits: vec![false] };
    let mut i = 0;
    while i < nodes.len() {
        i = ex.node(i)? + 1;
    }
    let cfg = &model.config;
    let graph = Graph {
        name: cfg.name.clone(),
        precision: cfg.quant.precision.name().to_string(),
        input: cfg.input,
        classes: cfg.classes,
        mean: mean.to_vec(),
        std: std.to_vec(),
        layers: ex.layers,
    };
    DeployedModel::new(graph, ex.tensors).context("the exported graph does not validate (a bug in export)")
}

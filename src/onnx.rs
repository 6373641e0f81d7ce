//! `sbdnet export --format onnx`: the float version of a model's architecture as ONNX
//! (opset 13, NCHW), so the same network can be timed in ONNX Runtime.
//!
//! Binary weights are exported as their latent float values and binary activations are left
//! out: the file is the full-precision counterpart of the trained network (identical for a
//! `float` model), not an emulation of the binary one. The protobuf is written by hand (a
//! few message types; no protobuf dependency).

use anyhow::{bail, Context, Result};
use sbdnet_nn::model::Op;
use sbdnet_nn::Model;

/// Protobuf wire writer.
#[derive(Default)]
struct Pb(Vec<u8>);

impl Pb {
    fn varint(&mut self, mut v: u64) {
        loop {
            let b = (v & 0x7f) as u8;
            v >>= 7;
            if v == 0 {
                self.0.push(b);
                return;
            }
            self.0.push(b | 0x80);
        }
    }
    fn key(&mut self, field: u32, wire: u32) {
        self.varint(((field << 3) | wire) as u64);
    }
    fn int(&mut self, field: u32, v: i64) {
        self.key(field, 0);
        self.varint(v as u64);
    }
    fn bytes(&mut self, field: u32, b: &[u8]) {
        self.key(field, 2);
        self.varint(b.len() as u64);
        self.0.extend_from_slice(b);
    }
    fn str(&mut self, field: u32, s: &str) {
        self.bytes(field, s.as_bytes());
    }
    fn msg(&mut self, field: u32, m: Pb) {
        self.bytes(field, &m.0);
    }
    fn float(&mut self, field: u32, v: f32) {
        self.key(field, 5);
        self.0.extend_from_slice(&v.to_le_bytes());
    }
}

enum Attr {
    Int(i64),
    Ints(Vec<i64>),
    Float(f32),
}

fn attr(name: &str, a: Attr) -> Pb {
    let mut p = Pb::default();
    p.str(1, name);
    match a {
        Attr::Float(f) => {
            p.float(2, f);
            p.int(20, 1);
        }
        Attr::Int(i) => {
            p.int(3, i);
            p.int(20, 2);
        }
        Attr::Ints(v) => {
            for i in v {
                p.int(8, i);
            }
            p.int(20, 7);
        }
    }
    p
}

fn tensor(name: &str, dims: &[usize], data: &[f32]) -> Pb {
    let mut p = Pb::default();
    for &d in dims {
        p.int(1, d as i64);
    }
    p.int(2, 1); // FLOAT
    p.str(8, name);
    let raw: Vec<u8> = data.iter().flat_map(|v| v.to_le_bytes()).collect();
    p.bytes(9, &raw);
    p
}

fn value_info(name: &str, dims: &[usize]) -> Pb {
    let mut shape = Pb::default();
    for &d in dims {
        let mut dim = Pb::default();
        dim.int(1, d as i64);
        shape.msg(1, dim);
    }
    let mut tt = Pb::default();
    tt.int(1, 1);
    tt.msg(2, shape);
    let mut ty = Pb::default();
    ty.msg(1, tt);
    let mut v = Pb::default();
    v.str(1, name);
    v.msg(2, ty);
    v
}

struct Graph {
    nodes: Vec<Pb>,
    inits: Vec<Pb>,
}

impl Graph {
    fn node(&mut self, op: &str, name: &str, inputs: &[&str], output: &str, attrs: Vec<Pb>) {
        let mut n = Pb::default();
        for i in inputs {
            n.str(1, i);
        }
        n.str(2, output);
        n.str(3, name);
        n.str(4, op);
        for a in attrs {
            n.msg(5, a);
        }
        self.nodes.push(n);
    }
    fn init(&mut self, name: &str, dims: &[usize], data: &[f32]) -> String {
        self.inits.push(tensor(name, dims, data));
        name.to_string()
    }
}

/// The ONNX bytes of `model`'s float architecture.
pub fn to_onnx(model: &Model) -> Result<Vec<u8>> {
    let p = &model.params;
    let get = |name: &str| -> Result<&[f32]> { p.find(name).with_context(|| format!("no tensor {name}")) };
    let mut g = Graph { nodes: Vec::new(), inits: Vec::new() };
    // Name of the ONNX value holding each training activation.
    let mut names: Vec<String> = vec!["input".to_string()];
    // Whether each value is already 2-D (N x features).
    let mut flat: Vec<bool> = vec![false];
    for node in &model.nodes {
        let x = names[node.inputs[0]].clone();
        let y = format!("{}.out", node.name);
        let nm = node.name.as_str();
        match &node.op {
            Op::Conv(cv) => {
                let (cout, cpg, k) = (cv.cout, cv.input.c / cv.groups, cv.k);
                let w = &p.data[cv.weight.range()];
                // OHWI -> OIHW
                let mut oihw = vec![0.0f32; w.len()];
                for o in 0..cout {
                    for ky in 0..k {
                        for kx in 0..k {
                            for i in 0..cpg {
                                oihw[((o * cpg + i) * k + ky) * k + kx] = w[((o * k + ky) * k + kx) * cpg + i];
                            }
                        }
                    }
                }
                let wn = g.init(&format!("{nm}.weight"), &[cout, cpg, k, k], &oihw);
                let pad = cv.pad as i64;
                let attrs = vec![
                    attr("kernel_shape", Attr::Ints(vec![k as i64, k as i64])),
                    attr("strides", Attr::Ints(vec![cv.stride as i64; 2])),
                    attr("pads", Attr::Ints(vec![pad; 4])),
                    attr("group", Attr::Int(cv.groups as i64)),
                ];
                g.node("Conv", nm, &[&x, &wn], &y, attrs);
            }
            Op::BatchNorm(bn) => {
                let ins: Vec<String> = ["gamma", "beta", "running_mean", "running_var"]
                    .iter()
                    .map(|t| -> Result<String> {
                        let v = get(&format!("{nm}.{t}"))?;
                        Ok(g.init(&format!("{nm}.{t}"), &[v.len()], v))
                    })
                    .collect::<Result<_>>()?;
                let bn_out = if bn.relu { format!("{nm}.bn") } else { y.clone() };
                let refs: Vec<&str> = std::iter::once(x.as_str()).chain(ins.iter().map(String::as_str)).collect();
                g.node("BatchNormalization", nm, &refs, &bn_out, vec![attr("epsilon", Attr::Float(bn.eps))]);
                if bn.relu {
                    g.node("Relu", &format!("{nm}.relu"), &[&bn_out], &y, vec![]);
                }
            }
            Op::Relu => g.node("Relu", nm, &[&x], &y, vec![]),
            Op::Hardtanh => {
                let lo = g.init(&format!("{nm}.min"), &[], &[-1.0]);
                let hi = g.init(&format!("{nm}.max"), &[], &[1.0]);
                g.node("Clip", nm, &[&x, &lo, &hi], &y, vec![]);
            }
            Op::BinAct(_) | Op::Dropout(_) => {
                // The float architecture has no binarization; dropout is the identity at inference.
                let f = flat[node.inputs[0]];
                names.push(x);
                flat.push(f);
                continue;
            }
            Op::Pool(pl) => {
                let op = if pl.max { "MaxPool" } else { "AveragePool" };
                let attrs = vec![
                    attr("kernel_shape", Attr::Ints(vec![pl.k as i64; 2])),
                    attr("strides", Attr::Ints(vec![pl.stride as i64; 2])),
                ];
                g.node(op, nm, &[&x], &y, attrs);
            }
            Op::GlobalAvgPool => g.node("GlobalAveragePool", nm, &[&x], &y, vec![]),
            Op::Flatten => {
                // sbdnet flattens NHWC; ONNX values are NCHW: transpose first when it matters.
                let s = node.in_shape;
                let src = if s.c > 1 && s.h * s.w > 1 {
                    let t = format!("{nm}.nhwc");
                    g.node(
                        "Transpose",
                        &format!("{nm}.transpose"),
                        &[&x],
                        &t,
                        vec![attr("perm", Attr::Ints(vec![0, 2, 3, 1]))],
                    );
                    t
                } else {
                    x.clone()
                };
                g.node("Flatten", nm, &[&src], &y, vec![attr("axis", Attr::Int(1))]);
            }
            Op::Linear(l) => {
                let w = g.init(&format!("{nm}.weight"), &[l.out, l.inp], &p.data[l.weight.range()]);
                let mut ins = vec![x.clone(), w];
                if let Some(b) = l.bias {
                    ins.push(g.init(&format!("{nm}.bias"), &[l.out], &p.data[b.range()]));
                }
                let refs: Vec<&str> = ins.iter().map(String::as_str).collect();
                // Gemm needs 2-D input: the preceding GAP gives N x C x 1 x 1.
                let src = if flat[node.inputs[0]] {
                    x.clone()
                } else {
                    let f = format!("{nm}.flat");
                    g.node("Flatten", &format!("{nm}.flatten"), &[&x], &f, vec![attr("axis", Attr::Int(1))]);
                    f
                };
                let mut refs = refs;
                refs[0] = src.as_str();
                g.node("Gemm", nm, &refs, &y, vec![attr("transB", Attr::Int(1))]);
            }
            Op::Add => {
                let other = names[node.inputs[1]].clone();
                g.node("Add", nm, &[&x, &other], &y, vec![]);
            }
            Op::DiagLinear(_) | Op::MaskedLinear(_) => bail!("{nm}: sparse linear layers are not exported to ONNX"),
            _ => bail!("{nm}: {} layers (vit-tiny, mixer-tiny) are not exported to ONNX yet", node.op.kind()),
        }
        let is_flat = matches!(node.op, Op::Flatten | Op::Linear(_))
            || (flat[node.inputs[0]] && !matches!(node.op, Op::Conv(_) | Op::Pool(_) | Op::GlobalAvgPool));
        names.push(y);
        flat.push(is_flat);
    }
    let [h, w, c] = model.config.input;
    let mut graph = Pb::default();
    for n in g.nodes {
        graph.msg(1, n);
    }
    graph.str(2, &model.config.name);
    for t in g.inits {
        graph.msg(5, t);
    }
    graph.msg(11, value_info("input", &[1, c, h, w]));
    let last = names.last().cloned().unwrap_or_default();
    graph.msg(12, value_info(&last, &[1, model.config.classes]));
    let mut m = Pb::default();
    m.int(1, 7); // ir_version
    m.str(2, "sbdnet");
    m.msg(7, graph);
    let mut opset = Pb::default();
    opset.str(1, "");
    opset.int(2, 13);
    m.msg(8, opset);
    Ok(m.0)
}

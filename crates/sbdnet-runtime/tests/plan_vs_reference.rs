//! The planned executor against the float reference executor on random deployed graphs:
//! a float first convolution binarized by thresholds, a binary depthwise 3x3 (stride 1 or 2),
//! binary pointwise layers (dense and sparse with group masks), global pooling and a linear
//! classifier; channel counts that are not multiples of 64, every padding border. The packed
//! W1A1 path must give the same bits, hence the same scores up to the float rounding of the
//! pooling; the W1 (float input) path in float mode must agree closely, and a file round trip
//! must give the same model.

use proptest::prelude::*;
use sbdnet_kernels::binary::{self, pack_conv_weights, pack_depthwise_weights};
use sbdnet_kernels::conv::ConvGeom;
use sbdnet_kernels::rng::Rng;
use sbdnet_runtime::graph::{Act, Conv, Graph, Layer, Op, Output, TensorData, Tensors, Weights};
use sbdnet_runtime::{reference, A8Mode, DeployedModel, Plan, PlanOptions};

struct Spec {
    cin: usize,
    h: usize,
    c1: usize,
    c2: usize,
    stride: usize,
    /// Group size of the sparse pointwise mask (0: dense), and whether the depthwise is sparse.
    group: usize,
    sparse_dw: bool,
    /// Binary activations (thresholds) or float activations (W1).
    bits: bool,
    seed: u64,
}

fn f32s(rng: &mut Rng, n: usize, scale: f32, offset: f32) -> TensorData {
    TensorData::F32((0..n).map(|_| offset + scale * rng.normal()).collect())
}

fn thresholds(rng: &mut Rng, n: usize, range: i32, t: &mut Tensors, name: &str) -> Output {
    let thr: Vec<i32> = (0..n)
        .map(|i| match i % 11 {
            0 => i32::MIN,
            1 => i32::MAX,
            _ => (rng.uniform() * (2 * range + 1) as f32) as i32 - range,
        })
        .collect();
    let flip: Vec<u8> = (0..n).map(|_| u8::from(rng.uniform() < 0.3)).collect();
    t.insert(format!("{name}.thr"), TensorData::I32(thr));
    t.insert(format!("{name}.flip"), TensorData::U8(flip));
    Output::Threshold { thr: format!("{name}.thr"), flip: format!("{name}.flip") }
}

fn affine(rng: &mut Rng, n: usize, act: Act, t: &mut Tensors, name: &str) -> Output {
    t.insert(format!("{name}.scale"), f32s(rng, n, 0.1, 0.0));
    t.insert(format!("{name}.bias"), f32s(rng, n, 0.5, 0.0));
    Output::Affine { scale: format!("{name}.scale"), bias: format!("{name}.bias"), act }
}

fn model(s: &Spec) -> DeployedModel {
    let mut rng = Rng::new(s.seed);
    let mut t = Tensors::new();
    let mut layers = Vec::new();
    // conv1: float 3x3, pad 1.
    t.insert("conv1.weight".into(), f32s(&mut rng, s.c1 * 9 * s.cin, 0.5, 0.0));
    let out1 = if s.bits {
        t.insert("conv1.scale".into(), f32s(&mut rng, s.c1, 0.5, 1.0));
        t.insert("conv1.bias".into(), f32s(&mut rng, s.c1, 0.2, 0.0));
        t.insert("conv1.t".into(), f32s(&mut rng, s.c1, 0.3, 0.0));
        Output::Sign { scale: "conv1.scale".into(), bias: "conv1.bias".into(), act: Act::Relu, t: "conv1.t".into() }
    } else {
        affine(&mut rng, s.c1, Act::Relu, &mut t, "conv1")
    };
    let conv1 = Conv {
        cin: s.cin,
        cout: s.c1,
        k: 3,
        stride: 1,
        pad: 1,
        groups: 1,
        weights: Weights::Float { tensor: "conv1.weight".into() },
        output: out1,
    };
    layers.push(Layer { name: "conv1".into(), inputs: vec![0], op: Op::Conv(conv1) });
    // dw: binary 3x3.
    let g = ConvGeom::new(1, s.h, s.h, s.c1, s.c1, 3, s.stride, 1, s.c1).unwrap();
    let wf: Vec<f32> = (0..s.c1 * 9).map(|_| rng.normal()).collect();
    let mut wb = vec![0u64; binary::dw_weight_words(&g)];
    pack_depthwise_weights(&g, &wf, &mut wb);
    t.insert("dw.bits".into(), TensorData::U64(wb));
    let mut dw_group_size = None;
    let dw_mask = s.sparse_dw.then(|| {
        let keep: Vec<u8> = (0..s.c1).map(|_| u8::from(rng.uniform() < 0.6)).collect();
        // With one channel, groups = cin = 1 makes the layer an ordinary convolution: its mask
        // is per tap ([cout][k*k][ceil(cin / G)]), so the channel's one kernel-wide group is
        // written as 9 equal tap groups of size 1.
        let mask = if s.c1 == 1 {
            dw_group_size = Some(1);
            vec![keep[0]; 9]
        } else {
            keep
        };
        t.insert("dw.mask".into(), TensorData::U8(mask));
        "dw.mask".to_string()
    });
    let out_dw = if s.bits {
        thresholds(&mut rng, s.c1, 6, &mut t, "dw")
    } else {
        affine(&mut rng, s.c1, Act::Hardtanh, &mut t, "dw")
    };
    let dw = Conv {
        cin: s.c1,
        cout: s.c1,
        k: 3,
        stride: s.stride,
        pad: 1,
        groups: s.c1,
        weights: Weights::Binary { bits: "dw.bits".into(), mask: dw_mask, group_size: dw_group_size },
        output: out_dw,
    };
    layers.push(Layer { name: "dw".into(), inputs: vec![1], op: Op::Conv(dw) });
    // pw: binary 1x1, optionally sparse.
    let pw_geom = ConvGeom::new(1, 1, 1, s.c1, s.c2, 1, 1, 0, 1).unwrap();
    let wf: Vec<f32> = (0..s.c2 * s.c1).map(|_| rng.normal()).collect();
    let mut wb = vec![0u64; binary::conv_weight_words(&pw_geom)];
    pack_conv_weights(&pw_geom, &wf, &mut wb);
    t.insert("pw.bits".into(), TensorData::U64(wb));
    let (pw_mask, gs) = if s.group > 0 {
        let per = s.c1.div_ceil(s.group);
        t.insert("pw.mask".into(), TensorData::U8((0..s.c2 * per).map(|_| u8::from(rng.uniform() < 0.4)).collect()));
        (Some("pw.mask".to_string()), Some(s.group))
    } else {
        (None, None)
    };
    let out_pw = if s.bits {
        thresholds(&mut rng, s.c2, 8, &mut t, "pw")
    } else {
        affine(&mut rng, s.c2, Act::Hardtanh, &mut t, "pw")
    };
    let pw = Conv {
        cin: s.c1,
        cout: s.c2,
        k: 1,
        stride: 1,
        pad: 0,
        groups: 1,
        weights: Weights::Binary { bits: "pw.bits".into(), mask: pw_mask, group_size: gs },
        output: out_pw,
    };
    layers.push(Layer { name: "pw".into(), inputs: vec![2], op: Op::Conv(pw) });
    // pw2: binary 1x1 to float.
    let pw2_geom = ConvGeom::new(1, 1, 1, s.c2, s.c2, 1, 1, 0, 1).unwrap();
    let wf: Vec<f32> = (0..s.c2 * s.c2).map(|_| rng.normal()).collect();
    let mut wb = vec![0u64; binary::conv_weight_words(&pw2_geom)];
    pack_conv_weights(&pw2_geom, &wf, &mut wb);
    t.insert("pw2.bits".into(), TensorData::U64(wb));
    let pw2 = Conv {
        cin: s.c2,
        cout: s.c2,
        k: 1,
        stride: 1,
        pad: 0,
        groups: 1,
        weights: Weights::Binary { bits: "pw2.bits".into(), mask: None, group_size: None },
        output: affine(&mut rng, s.c2, Act::Hardtanh, &mut t, "pw2"),
    };
    layers.push(Layer { name: "pw2".into(), inputs: vec![3], op: Op::Conv(pw2) });
    layers.push(Layer { name: "gap".into(), inputs: vec![4], op: Op::GlobalAvgPool });
    t.insert("fc.weight".into(), f32s(&mut rng, 10 * s.c2, 0.3, 0.0));
    t.insert("fc.bias".into(), f32s(&mut rng, 10, 0.1, 0.0));
    layers.push(Layer {
        name: "fc".into(),
        inputs: vec![5],
        op: Op::Linear { inp: s.c2, out: 10, weight: "fc.weight".into(), bias: Some("fc.bias".into()) },
    });
    let graph = Graph {
        name: "test".into(),
        precision: if s.bits { "w1a1" } else { "w1" }.into(),
        input: [s.h, s.h, s.cin],
        classes: 10,
        mean: vec![0.0; s.cin],
        std: vec![1.0; s.cin],
        layers,
    };
    DeployedModel::new(graph, t).expect("valid test graph")
}

fn check(s: &Spec, batch: usize) {
    let m = model(s);
    // Through the file format too.
    let bytes = m.to_bytes().unwrap();
    let m = DeployedModel::from_bytes(&bytes, "test").unwrap();
    let mut rng = Rng::new(s.seed ^ 99);
    let x: Vec<f32> = (0..batch * s.h * s.h * s.cin).map(|_| rng.normal()).collect();
    let want = reference::run(&m, &x, batch).unwrap();
    let mut plan = Plan::new(&m, batch, PlanOptions { a8: A8Mode::Float }).unwrap();
    let got = plan.run(&x, batch).unwrap().to_vec();
    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
        let tol = if s.bits { 1e-5 } else { 1e-3 } * (1.0 + w.abs());
        assert!(
            (g - w).abs() <= tol,
            "score {i}: planned {g} vs reference {w} ({} {}x{} {}->{}->{} s{} g{} dw{})",
            if s.bits { "w1a1" } else { "w1" },
            s.h,
            s.h,
            s.cin,
            s.c1,
            s.c2,
            s.stride,
            s.group,
            s.sparse_dw
        );
    }
    // A smaller batch through the same plan.
    if batch > 1 {
        let got1 = plan.run(&x[..s.h * s.h * s.cin], 1).unwrap();
        for (g, w) in got1.iter().zip(&want[..10]) {
            assert!((g - w).abs() <= 1e-3 * (1.0 + w.abs()));
        }
    }
}

#[test]
fn named_cases() {
    for (i, &(cin, h, c1, c2, stride, group, sparse_dw)) in [
        (1, 7, 32, 64, 1, 0, false),
        (3, 6, 70, 130, 2, 0, false),
        (1, 5, 64, 64, 2, 16, true),
        (2, 9, 100, 33, 1, 8, true),
        (1, 4, 130, 65, 1, 64, false),
    ]
    .iter()
    .enumerate()
    {
        for bits in [true, false] {
            check(&Spec { cin, h, c1, c2, stride, group, sparse_dw, bits, seed: i as u64 }, 2);
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]
    #[test]
    fn random_graphs(cin in 1usize..4, h in 3usize..10, c1 in 1usize..140, c2 in 1usize..140,
                     stride in 1usize..3, group in prop::sample::select(vec![0usize, 4, 8, 16, 64]),
                     sparse_dw: bool, bits: bool, seed: u64, batch in 1usize..3) {
        check(&Spec { cin, h, c1, c2, stride, group: group.min(c1), sparse_dw, bits, seed }, batch);
    }
}

#[test]
fn loader_rejects_damaged_files_without_panicking() {
    let m = model(&Spec { cin: 1, h: 6, c1: 40, c2: 70, stride: 2, group: 8, sparse_dw: true, bits: true, seed: 3 });
    let bytes = m.to_bytes().unwrap();
    assert!(DeployedModel::from_bytes(&bytes, "ok").is_ok());
    // Every truncation is an error.
    for cut in (0..bytes.len()).step_by(97) {
        assert!(DeployedModel::from_bytes(&bytes[..cut], "cut").is_err(), "truncated at {cut} loaded");
    }
    // One flipped bit in the tensor data (the last byte of the file) fails the checksum.
    let mut b = bytes.clone();
    *b.last_mut().unwrap() ^= 4;
    let err = DeployedModel::from_bytes(&b, "flipped").unwrap_err().to_string();
    assert!(err.contains("checksum"), "{err}");
    // (`format::reseal` finds the checksum: a file whose stored checksum was damaged loads again.)
    let mut b = bytes.clone();
    let at = b.windows(10).position(|w| w == b"\"checksum\"").unwrap() + 12;
    b[at] ^= 1;
    assert!(DeployedModel::from_bytes(&b, "bad sum").is_err());
    sbdnet_runtime::format::reseal(&mut b);
    assert!(DeployedModel::from_bytes(&b, "resealed").is_ok());
    // Random byte flips: an error or a valid model, never a panic. Every other damaged file
    // gets its checksum recomputed, so damaged data also reaches the validation behind it.
    let mut rng = Rng::new(5);
    for round in 0..400 {
        let mut b = bytes.clone();
        for _ in 0..1 + (rng.uniform() * 4.0) as usize {
            let i = (rng.uniform() * b.len() as f32) as usize % b.len();
            b[i] ^= 1 << ((rng.uniform() * 8.0) as u32 % 8);
        }
        if round % 2 == 1 {
            sbdnet_runtime::format::reseal(&mut b);
        }
        if let Ok(m) = DeployedModel::from_bytes(&b, "flipped") {
            // Whatever loads must also plan and run.
            let mut p = Plan::new(&m, 1, PlanOptions::default()).unwrap();
            let x = vec![0.5f32; m.values[0].len()];
            p.run(&x, 1).unwrap();
        }
    }
    // A graph that names a missing tensor, a wrong size, or an absurd input is refused.
    let mut g = m.graph.clone();
    g.input = [1 << 20, 1 << 20, 1];
    assert!(DeployedModel::new(g, m.tensors.clone()).is_err());
    let mut t = m.tensors.clone();
    t.remove("pw.bits");
    assert!(DeployedModel::new(m.graph.clone(), t).is_err());
    let mut t = m.tensors.clone();
    t.insert("pw.thr".into(), TensorData::I32(vec![0; 3]));
    assert!(DeployedModel::new(m.graph.clone(), t).is_err());
}

#[test]
fn one_channel_sparse_depthwise_is_an_ordinary_convolution() {
    for bits in [true, false] {
        check(&Spec { cin: 1, h: 5, c1: 1, c2: 3, stride: 1, group: 0, sparse_dw: true, bits, seed: 7 }, 2);
    }
}

/// The float layers of the shortcut models (activation, average and max pooling, addition)
/// through the planned executor equal the reference executor, channel counts not a multiple
/// of the vector width, two images.
#[test]
fn float_layers_of_shortcut_models_match_the_reference() {
    for (h, c, act) in [(6, 5, Act::Hardtanh), (8, 19, Act::Relu), (4, 16, Act::None)] {
        let mut rng = Rng::new(c as u64);
        let mut t = Tensors::new();
        let layer = |name: &str, inputs: Vec<usize>, op: Op| Layer { name: name.into(), inputs, op };
        let mut layers = vec![
            layer("act", vec![0], Op::Activation { act }),
            layer("avg", vec![1], Op::Pool { k: 2, stride: 2, max: false }),
            layer("max", vec![1], Op::Pool { k: 2, stride: 2, max: true }),
            layer("add", vec![2, 3], Op::Add),
            layer("gap", vec![4], Op::GlobalAvgPool),
        ];
        t.insert("fc.weight".into(), f32s(&mut rng, 10 * c, 0.3, 0.0));
        t.insert("fc.bias".into(), f32s(&mut rng, 10, 0.1, 0.0));
        layers.push(layer(
            "fc",
            vec![5],
            Op::Linear { inp: c, out: 10, weight: "fc.weight".into(), bias: Some("fc.bias".into()) },
        ));
        let graph = Graph {
            name: "float-layers".into(),
            precision: "float".into(),
            input: [h, h, c],
            classes: 10,
            mean: vec![0.0; c],
            std: vec![1.0; c],
            layers,
        };
        let m = DeployedModel::new(graph, t).expect("valid test graph");
        let x: Vec<f32> = (0..2 * h * h * c).map(|_| rng.normal() * 2.0).collect();
        let want = reference::run(&m, &x, 2).unwrap();
        let got = Plan::new(&m, 2, PlanOptions::default()).unwrap().run(&x, 2).unwrap().to_vec();
        for (g, w) in got.iter().zip(&want) {
            assert!((g - w).abs() <= 1e-5 * (1.0 + w.abs()), "{h}x{h}x{c} {act:?}: planned {g} vs reference {w}");
        }
    }
}

//! Binary-activation (w1a1) models: where the real-valued shortcuts go, and initialization
//! from another model's checkpoint.

use sbdnet_nn::model::Op;
use sbdnet_nn::{checkpoint, Model, ModelConfig, Precision, QuantConfig};

fn dscnn(precision: Precision, real_shortcut: bool) -> Model {
    let q = QuantConfig { precision, real_shortcut, ..Default::default() };
    Model::new(ModelConfig::build("dscnn", [8, 8, 1], 10, 0.25, q).unwrap(), 2, 0).unwrap()
}

fn names_of(m: &Model, kind: &str) -> Vec<String> {
    m.nodes.iter().filter(|n| n.op.kind() == kind).map(|n| n.name.clone()).collect()
}

#[test]
fn shortcuts_wrap_every_shape_preserving_binary_conv() {
    let m = dscnn(Precision::W1A1, true);
    // dscnn: block1 8->16 s1, block2 16->32 s2, block3 32->32 s1, block4 32->64 s2 (width 0.25).
    // Depthwise convolutions keep channels (identity, or 2x2 average pool at stride 2); the
    // pointwise ones only where channels are kept (block3).
    let adds = names_of(&m, "add");
    assert_eq!(
        adds,
        [
            "block1.dw.shortcut_add",
            "block2.dw.shortcut_add",
            "block3.dw.shortcut_add",
            "block3.pw.shortcut_add",
            "block4.dw.shortcut_add"
        ]
    );
    assert_eq!(names_of(&m, "avgpool"), ["block2.dw.shortcut_pool", "block4.dw.shortcut_pool"]);
    for n in m.nodes.iter().filter(|n| n.op.kind() == "add") {
        // The first summand is the binary convolution's batch norm, the second the shortcut.
        let a = n.inputs[0];
        assert!(m.nodes[a - 1].name.ends_with("_bn"), "{}: {}", n.name, m.nodes[a - 1].name);
    }
    // Every binary activation still feeds exactly one binary convolution, right after it.
    let binacts: Vec<usize> = (0..m.nodes.len()).filter(|&i| matches!(m.nodes[i].op, Op::BinAct(_))).collect();
    assert_eq!(binacts.len(), 8);
    for i in binacts {
        let readers: Vec<usize> = (0..m.nodes.len()).filter(|&j| m.nodes[j].inputs.contains(&(i + 1))).collect();
        assert_eq!(readers, [i + 1], "{}", m.nodes[i].name);
        assert!(matches!(&m.nodes[i + 1].op, Op::Conv(c) if c.bin.is_some()));
    }
    // The block activation comes after the sum.
    let i = m.nodes.iter().position(|n| n.name == "block3.pw.shortcut_add").unwrap();
    assert_eq!(m.nodes[i + 1].op.kind(), "hardtanh");

    // Off by default, and without binary activations.
    assert!(names_of(&dscnn(Precision::W1A1, false), "add").is_empty());
    assert!(names_of(&dscnn(Precision::W1, true), "add").is_empty());
}

#[test]
fn shortcut_knob_round_trips_and_defaults_off() {
    let q: QuantConfig = serde_json::from_str(r#"{"precision":"w1a1"}"#).unwrap();
    assert!(!q.real_shortcut);
    let q = QuantConfig { precision: Precision::W1A1, real_shortcut: true, ..Default::default() };
    let back: QuantConfig = serde_json::from_str(&serde_json::to_string(&q).unwrap()).unwrap();
    assert_eq!(back, q);
}

#[test]
fn init_copies_matching_tensors_and_keeps_the_rest() {
    let dir = std::env::temp_dir().join(format!("sbdnet-nn-init-{}", std::process::id()));
    let mut src = dscnn(Precision::Float, false);
    for v in src.params.data.iter_mut() {
        *v += 0.5;
    }
    checkpoint::save(&dir, &src, None, "{}").unwrap();
    let ck = checkpoint::Checkpoint::read(&dir).unwrap();
    let mut dst = dscnn(Precision::W1A1, true);
    let (copied, skipped) = ck.apply_matching(&mut dst);
    assert_eq!(skipped.len(), 8, "{skipped:?}");
    assert!(skipped.iter().all(|n| n.ends_with(".act_threshold")));
    assert_eq!(copied, dst.params.tensors.len() + dst.params.buffer_tensors.len() - 8);
    for t in &dst.params.tensors {
        let got = &dst.params.data[t.range()];
        match src.params.get(&t.name) {
            Some(want) => assert_eq!(got, want, "{}", t.name),
            None => assert!(got.iter().all(|&v| v == 0.0), "{}", t.name),
        }
    }
    std::fs::remove_dir_all(&dir).ok();
}

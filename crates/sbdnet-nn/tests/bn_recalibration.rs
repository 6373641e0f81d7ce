//! Batch-norm re-estimation: after `set_bn_recalibration(true)` and training-mode forward
//! passes, each running mean is the plain average of the batch means it saw.

use sbdnet_kernels::rng::Rng;
use sbdnet_nn::model::Op;
use sbdnet_nn::{Block, ModelConfig};

#[test]
fn running_mean_becomes_the_average_of_batch_means() {
    let cfg = ModelConfig {
        name: "t".into(),
        input: [1, 1, 3],
        classes: 3,
        blocks: vec![Block::Conv { out: 3, kernel: 1, stride: 1, act: sbdnet_nn::Act::None }, Block::Flatten],
        quant: Default::default(),
    };
    let mut m = sbdnet_nn::Model::new(cfg, 4, 1).unwrap();
    let mut r = Rng::new(2);
    let batches: Vec<Vec<f32>> = (0..3).map(|_| (0..12).map(|_| r.normal() * 2.0 + 1.0).collect()).collect();
    for b in &batches {
        m.forward(b, 4, true).unwrap();
    }
    m.set_bn_recalibration(true);
    let before = m.params.buffers.clone();
    let mut seen = Vec::new();
    for b in &batches {
        let rm_prev: Vec<f32> = m.params.buffers[..3].to_vec();
        m.forward(b, 4, true).unwrap();
        seen.push((rm_prev, m.params.buffers[..3].to_vec()));
    }
    m.set_bn_recalibration(false);
    // The k-th update weighs 1/k, so the first replaces the old value entirely and the last
    // leaves the plain average of the three batch means; afterwards the momentum is back.
    assert_ne!(before[..3], seen[0].1[..]);
    let bn_is_cumulative_off = m.nodes.iter().all(|n| match &n.op {
        Op::BatchNorm(bn) => bn.cumulative.is_none() && bn.momentum == 0.1,
        _ => true,
    });
    assert!(bn_is_cumulative_off);
    // Running the same three batches again from a different start gives the same result:
    // a plain average does not depend on where it started.
    m.params.buffers[..3].copy_from_slice(&[100.0, -100.0, 7.0]);
    m.set_bn_recalibration(true);
    for b in &batches {
        m.forward(b, 4, true).unwrap();
    }
    m.set_bn_recalibration(false);
    let again = m.params.buffers[..3].to_vec();
    for (a, b) in again.iter().zip(&seen[2].1) {
        assert!((a - b).abs() < 1e-5, "{again:?} vs {:?}", seen[2].1);
    }
}

//! Criterion groups per binary kernel family on the real layer shapes of dscnn (28x28
//! inputs) and mobilenet (32x32x3 inputs, first convolution stride 1), batch 1, on the
//! implementation this process selects (`SBDNET_KERNEL=portable` for the fallback).
//! Throughput is in binary multiply-accumulates (one XNOR + popcount bit each), so
//! criterion's `elem/s` is binary operations per second, comparable with the machine's
//! popcount limit (`cargo test --release -p sbdnet-kernels popcount_limit -- --ignored
//! --nocapture`).
//!
//! `cargo bench -p sbdnet-kernels --bench binary` (add `-- pointwise` for one group).

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use sbdnet_kernels::binary::pointwise::PackedPointwise;
use sbdnet_kernels::binary::sparse::SparsePointwise;
use sbdnet_kernels::binary::{
    bconv_forward, bdw_forward_packed, dw_weight_words, in_words, out_words, pack_conv_weights, pack_depthwise_weights,
    pack_signs, words, DwThresholds, SignThreshold,
};
use sbdnet_kernels::conv::ConvGeom;
use sbdnet_kernels::rng::Rng;
use sbdnet_kernels::shapes::{DEPTHWISE, POINTWISE};
use std::hint::black_box;

fn signs(r: &mut Rng, n: usize, c: usize) -> Vec<u64> {
    let f: Vec<f32> = (0..n).map(|_| r.normal()).collect();
    let mut p = vec![0u64; n / c * words(c)];
    pack_signs(&f, c, &mut p);
    p
}

fn thresholds(r: &mut Rng, c: usize) -> Vec<SignThreshold> {
    (0..c).map(|_| SignThreshold { thr: r.below(9) as i32 - 4, negative: r.below(2) == 0 }).collect()
}

fn pointwise(c: &mut Criterion) {
    let mut group = c.benchmark_group("pointwise");
    let mut r = Rng::new(1);
    for &(model, side, cin, cout) in POINTWISE {
        let rows = side * side;
        let x = signs(&mut r, rows * cin, cin);
        let w = signs(&mut r, cout * cin, cin);
        let thr = thresholds(&mut r, cout);
        let dense = PackedPointwise::new(cin, cout, &w).with_thresholds(&thr);
        // 70% of the groups of 16 input channels pruned, as in the Sparse BD-Net sweep.
        let per = cin.div_ceil(16);
        let mask: Vec<u8> = (0..cout * per).map(|_| u8::from(r.below(10) < 3)).collect();
        let sparse = SparsePointwise::new(cin, cout, &w, &mask, 16).with_thresholds(&thr);
        let (mut out, mut scratch) = (vec![0u64; rows * words(cout)], vec![0i32; cout]);
        let id = format!("{model}/{side}x{side}/{cin}->{cout}");
        group.throughput(Throughput::Elements((rows * cin * cout) as u64));
        group.bench_function(BenchmarkId::new("dense", &id), |b| {
            b.iter(|| dense.forward_packed(black_box(&x), rows, &mut out, &mut scratch))
        });
        // Throughput of the sparse kernel counted on the kept weights only.
        let kept: usize = mask.iter().map(|&m| m as usize).sum::<usize>() * 16;
        group.throughput(Throughput::Elements((rows * kept.min(cin * cout)) as u64));
        group.bench_function(BenchmarkId::new("sparse-g16-70", &id), |b| {
            b.iter(|| sparse.forward_packed(black_box(&x), rows, &mut out))
        });
    }
    group.finish();
}

fn depthwise(c: &mut Criterion) {
    let mut group = c.benchmark_group("depthwise");
    let mut r = Rng::new(2);
    for &(model, side, ch, stride) in DEPTHWISE {
        let g = ConvGeom::new(1, side, side, ch, ch, 3, stride, 1, ch).expect("geometry");
        let x = signs(&mut r, side * side * ch, ch);
        let wf: Vec<f32> = (0..g.weight_len()).map(|_| r.normal()).collect();
        let mut w = vec![0u64; dw_weight_words(&g)];
        pack_depthwise_weights(&g, &wf, &mut w);
        let thr = DwThresholds::new(&thresholds(&mut r, ch));
        let mut out = vec![0u64; out_words(&g)];
        group.throughput(Throughput::Elements((g.oh * g.ow * ch * 9) as u64));
        let id = format!("{model}/{side}x{side}x{ch}/s{stride}");
        group.bench_function(BenchmarkId::new("bitsliced", id), |b| {
            b.iter(|| bdw_forward_packed(&g, black_box(&x), &w, &thr, &mut out))
        });
    }
    group.finish();
}

/// The general k x k kernel on bits (integer output): what a dense binary 3x3 convolution
/// (a binarized first layer on binary inputs, or a non-separable block) costs.
fn conv3x3(c: &mut Criterion) {
    let mut group = c.benchmark_group("conv3x3");
    let mut r = Rng::new(3);
    for &(side, cin, cout) in &[(14usize, 64usize, 64usize), (8, 128, 128)] {
        let g = ConvGeom::new(1, side, side, cin, cout, 3, 1, 1, 1).expect("geometry");
        let x = signs(&mut r, side * side * cin, cin);
        assert_eq!(x.len(), in_words(&g));
        let wf: Vec<f32> = (0..g.weight_len()).map(|_| r.normal()).collect();
        let mut w = vec![0u64; sbdnet_kernels::binary::conv_weight_words(&g)];
        pack_conv_weights(&g, &wf, &mut w);
        let mut out = vec![0i32; g.out_len()];
        group.throughput(Throughput::Elements((g.oh * g.ow * cout * cin * 9) as u64));
        group.bench_function(BenchmarkId::new("xnor-popcount", format!("{side}x{side}/{cin}->{cout}")), |b| {
            b.iter(|| bconv_forward(&g, black_box(&x), &w, &mut out))
        });
    }
    group.finish();
}

criterion_group! {
    name = binary;
    config = Criterion::default().sample_size(30).warm_up_time(std::time::Duration::from_millis(300)).measurement_time(std::time::Duration::from_secs(1));
    targets = pointwise, depthwise, conv3x3
}
criterion_main!(binary);

//! Criterion groups for the W1-A8 kernels (binary weights on 8-bit activations, additions
//! and lookups only) on the real layer shapes of dscnn (28x28 inputs) and mobilenet (32x32x3
//! inputs, first convolution stride 1), batch 1, one layer call each: quantization of the
//! `f32` input, the integer kernel and the `f32` output. Throughput is in multiply-accumulates
//! of the layer (each an addition or subtraction of an 8-bit activation), so criterion's
//! `elem/s` compares kernels of one shape directly.
//!
//! Pointwise layers run on every kernel the machine has: `masked` (AVX-512 BW masked 16-bit
//! adds), `lookup-w` and `lookup-b` (5-input subset-sum tables indexed with `vpermw` or, with
//! AVX-512 VBMI, `vpermb`) and `wide` (16-bit AND-masks, the portable/AVX2 loop).
//!
//! `cargo bench -p sbdnet-runtime --bench w1a8` (add `-- pointwise` for one group).

use criterion::measurement::WallTime;
use criterion::{criterion_group, criterion_main, BenchmarkGroup, BenchmarkId, Criterion, Throughput};
use sbdnet_kernels::conv::ConvGeom;
use sbdnet_kernels::rng::Rng;
use sbdnet_kernels::shapes::{DEPTHWISE, POINTWISE};
use sbdnet_runtime::int8::{avx512_available, vbmi_available, A8Conv, Layout, QuantScratch};
use std::hint::black_box;

fn signs(r: &mut Rng, n: usize) -> Vec<f32> {
    (0..n).map(|_| if r.uniform() < 0.5 { -1.0 } else { 1.0 }).collect()
}

fn run(group: &mut BenchmarkGroup<'_, WallTime>, name: &str, id: &str, g: ConvGeom, w: &[f32], layout: Layout) {
    let mut r = Rng::new(3);
    let x: Vec<f32> = (0..g.in_len()).map(|_| r.normal()).collect();
    let conv = A8Conv::with_layout(g, w, layout);
    let mut s = QuantScratch::default();
    s.reserve(&conv);
    let mut y = vec![0.0f32; g.out_len()];
    group.bench_function(BenchmarkId::new(name, id), |b| {
        b.iter(|| conv.forward(1, black_box(&x), &mut y, &mut s, false));
    });
}

fn pointwise(c: &mut Criterion) {
    let mut group = c.benchmark_group("pointwise");
    let mut r = Rng::new(1);
    for &(model, side, cin, cout) in POINTWISE {
        let g = ConvGeom::new(1, side, side, cin, cout, 1, 1, 0, 1).expect("valid shape");
        let w = signs(&mut r, g.weight_len());
        let id = format!("{model}/{side}x{side}/{cin}->{cout}");
        group.throughput(Throughput::Elements((side * side * cin * cout) as u64));
        run(&mut group, "wide", &id, g, &w, Layout::Wide);
        if avx512_available() {
            run(&mut group, "masked", &id, g, &w, Layout::Bits);
            run(&mut group, "lookup-w", &id, g, &w, Layout::Lut(false));
        }
        if vbmi_available() {
            run(&mut group, "lookup-b", &id, g, &w, Layout::Lut(true));
        }
    }
    group.finish();
}

fn depthwise(c: &mut Criterion) {
    let mut group = c.benchmark_group("depthwise");
    let mut r = Rng::new(2);
    for &(model, side, ch, stride) in DEPTHWISE {
        let g = ConvGeom::new(1, side, side, ch, ch, 3, stride, 1, ch).expect("valid shape");
        let w = signs(&mut r, g.weight_len());
        let id = format!("{model}/{side}x{side}x{ch}/s{stride}");
        group.throughput(Throughput::Elements((g.oh * g.ow * ch * 9) as u64));
        run(&mut group, "wide", &id, g, &w, Layout::Wide);
        if avx512_available() {
            run(&mut group, "masked", &id, g, &w, Layout::Bits);
        }
    }
    group.finish();
}

criterion_group!(benches, pointwise, depthwise);
criterion_main!(benches);

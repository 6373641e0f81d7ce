//! A training step allocates nothing on the heap in sbdnet's own code: parameters,
//! gradients, activations and every layer's scratch are planned when the model is built.
//! Checked with a counting global allocator around steps after the first. The `gemm` crate
//! allocates its packing workspace inside some calls; those are counted apart (while a
//! `gemm` call is running) and reported, everything else must be zero.

use sbdnet_nn::{Loss, Model, ModelConfig, Optimizer, OptimizerConfig};
use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

struct Counting;
static COUNT: AtomicUsize = AtomicUsize::new(0);
static IN_GEMM: AtomicUsize = AtomicUsize::new(0);
static ON: AtomicBool = AtomicBool::new(false);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        if ON.load(Ordering::Relaxed) {
            if sbdnet_kernels::matmul::GEMM_ACTIVE.load(Ordering::SeqCst) > 0 {
                IN_GEMM.fetch_add(1, Ordering::Relaxed);
            } else {
                COUNT.fetch_add(1, Ordering::Relaxed);
            }
        }
        unsafe { System.alloc(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        unsafe { System.dealloc(p, l) }
    }
}

#[global_allocator]
static A: Counting = Counting;

#[test]
fn train_steps_do_not_allocate() {
    // One thread: rayon's pool start-up allocates, and with more threads its work-stealing
    // deques may grow; the model's own code is what this test pins down.
    let pool = rayon::ThreadPoolBuilder::new().num_threads(1).build().unwrap();
    pool.install(|| {
        for name in ["dscnn", "cnn", "vit-tiny"] {
            let cfg = ModelConfig::preset(name, [28, 28, 1], 10).unwrap();
            let mut m = Model::new(cfg, 8, 0).unwrap();
            let mut opt = Optimizer::new(OptimizerConfig::default(), m.params.len());
            let x = vec![0.25f32; 8 * 784];
            let y = [0u8, 1, 2, 3, 4, 5, 6, 7];
            let loss = Loss::default();
            m.train_step(&x, &y, &loss).unwrap();
            opt.step(&mut m.params, 0.01);
            use sbdnet_kernels::matmul::GEMM_CALLS;
            let calls0 = GEMM_CALLS.load(Ordering::SeqCst);
            COUNT.store(0, Ordering::SeqCst);
            IN_GEMM.store(0, Ordering::SeqCst);
            ON.store(true, Ordering::SeqCst);
            for _ in 0..3 {
                m.train_step(&x, &y, &loss).unwrap();
                opt.step(&mut m.params, 0.01);
                m.eval_batch(&x, &y).unwrap();
            }
            ON.store(false, Ordering::SeqCst);
            let gemm_calls = (GEMM_CALLS.load(Ordering::SeqCst) - calls0) as usize;
            assert!(gemm_calls > 0);
            eprintln!(
                "{name}: {} allocations inside {gemm_calls} gemm calls (3 steps + 3 evals)",
                IN_GEMM.load(Ordering::SeqCst)
            );
            assert_eq!(COUNT.load(Ordering::SeqCst), 0, "{name}: heap allocations inside the step loop outside gemm");
        }
    });
}

//! Compute kernels for sbdnet.
//!
//! Everything here works on plain `f32` slices in **NHWC** order (batch, height, width,
//! channels; channels contiguous), so the channel loop of depthwise convolution, batch
//! normalization and pooling is the vectorized one, and a 1x1 convolution is one GEMM over
//! `B*H*W` rows.
//!
//! Each kernel family has a plain reference implementation (obvious loops, the oracle; see
//! [`reference`](mod@reference)) and an optimized one (threaded with rayon, vectorized). The optimized bodies
//! are written once and compiled twice: as portable code and inside
//! `#[target_feature(enable = "avx2,fma")]` wrappers chosen at run time with
//! `is_x86_feature_detected!` (see [`dispatch`]). `SBDNET_KERNEL=portable` forces the portable
//! build, `SBDNET_KERNEL=reference` the reference loops, so tests cover every path.
//!
//! Matrix products go through the [`gemm`](https://docs.rs/gemm) crate ([`matmul`]).
//!
//! ```
//! use sbdnet_kernels::matmul::{sgemm, Trans};
//! // C[2x2] = A[2x3] * B[3x2]
//! let a = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0];
//! let b = [1.0, 0.0, 0.0, 1.0, 1.0, 1.0];
//! let mut c = [0.0f32; 4];
//! sgemm(2, 2, 3, &a, Trans::No, &b, Trans::No, &mut c, false, 1);
//! assert_eq!(c, [4.0, 5.0, 10.0, 11.0]);
//! ```
#![deny(missing_docs)]

pub mod binary;
pub mod checksum;
pub mod conv;
pub mod csr;
pub mod diag;
pub mod dispatch;
pub mod elementwise;
pub mod matmul;
pub mod pool;
pub mod reference;
pub mod rng;
pub mod shapes;
#[cfg(target_arch = "x86_64")]
pub mod x86_64;

pub use dispatch::{kernel_path, KernelPath};

/// A per-channel affine's activation on 16 lanes: `act` 0 none, 1 ReLU, 2 hardtanh (`max`
/// then `min`). `max_ps(y, c)` returns `c` for a NaN `y`, as `f32::max` does, so NaN becomes
/// 0 (ReLU) or -1 (hardtanh), the scalar `Act::apply` rule of the runtime.
///
/// # Safety
/// AVX-512 F: inline only into functions that enable it.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
pub unsafe fn act512(y: std::arch::x86_64::__m512, act: u8) -> std::arch::x86_64::__m512 {
    use std::arch::x86_64::*;
    match act {
        1 => _mm512_max_ps(y, _mm512_setzero_ps()),
        2 => _mm512_min_ps(_mm512_max_ps(y, _mm512_set1_ps(-1.0)), _mm512_set1_ps(1.0)),
        _ => y,
    }
}

/// [`act512`] on 8 lanes (the same rule: `max` then `min`, NaN to 0 or -1).
///
/// # Safety
/// AVX: inline only into functions that enable it.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
pub unsafe fn act256(y: std::arch::x86_64::__m256, act: u8) -> std::arch::x86_64::__m256 {
    use std::arch::x86_64::*;
    match act {
        1 => _mm256_max_ps(y, _mm256_setzero_ps()),
        2 => _mm256_min_ps(_mm256_max_ps(y, _mm256_set1_ps(-1.0)), _mm256_set1_ps(1.0)),
        _ => y,
    }
}

/// The mask of the first `n` of 16 lanes (all of them for `n >= 16`): the partial-vector
/// mask of the AVX-512 kernels here and in the runtime.
#[inline(always)]
pub fn lanes16(n: usize) -> u16 {
    if n >= 16 {
        0xFFFF
    } else {
        (1u16 << n) - 1
    }
}

/// How a backward kernel writes an input gradient `dx`.
///
/// Backward passes of a graph add into `dx` where an activation feeds several layers, but
/// the first (in backward order) writer of each activation can simply overwrite it, which
/// saves zeroing the whole gradient buffer every step and one read of it per layer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GradMode {
    /// Not needed (the network input): kernels may skip the work.
    Skip,
    /// Overwrite `dx` with the gradient.
    Write,
    /// Add the gradient into `dx`.
    Add,
}

impl GradMode {
    /// True when the kernel adds into existing values.
    pub fn adds(self) -> bool {
        self == GradMode::Add
    }
}

/// Split `n` items into `parts` contiguous ranges of nearly equal size (the first ones one
/// larger). The split depends only on `n` and `parts`, which is what makes threaded
/// reductions reproducible for a given thread count.
pub fn split_ranges(n: usize, parts: usize) -> Vec<std::ops::Range<usize>> {
    let parts = parts.max(1).min(n.max(1));
    let base = n / parts;
    let extra = n % parts;
    let mut out = Vec::with_capacity(parts);
    let mut start = 0;
    for p in 0..parts {
        let len = base + usize::from(p < extra);
        out.push(start..start + len);
        start += len;
    }
    out
}

/// Range `i` of [`split_ranges`]`(n, parts)`, computed without allocating.
pub fn chunk_range(n: usize, parts: usize, i: usize) -> std::ops::Range<usize> {
    let parts = parts.max(1).min(n.max(1));
    let base = n / parts;
    let extra = n % parts;
    let start = i * base + i.min(extra);
    start..start + base + usize::from(i < extra)
}

/// Number of worker threads kernels split their work into: the current rayon pool's size.
pub fn threads() -> usize {
    rayon::current_num_threads().max(1)
}

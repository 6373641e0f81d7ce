//! AVX2 popcount for the binary kernels: the `vpshufb` nibble-table method (Mula). Each
//! 256-bit block of `x XOR w` is split into nibbles, each nibble's bit count looked up with
//! `vpshufb`, and the byte counts summed per 64-bit lane with `vpsadbw`; tails of fewer than
//! 4 words use `POPCNT`.
//!
//! Only called from functions compiled with `#[target_feature(enable = "avx2,popcnt")]`.

#![allow(unsafe_op_in_unsafe_fn)]
use super::conv::PopXor;
use std::arch::x86_64::*;

/// Popcount of `x ^ w` over a run: AVX2 nibble table for blocks of 4 words, `POPCNT` tails.
pub(super) struct Shuffle;

#[inline(always)]
unsafe fn block(x: &[u64], w: &[u64], j: usize) -> __m256i {
    let lut = _mm256_setr_epi8(
        0, 1, 1, 2, 1, 2, 2, 3, 1, 2, 2, 3, 2, 3, 3, 4, 0, 1, 1, 2, 1, 2, 2, 3, 1, 2, 2, 3, 2, 3, 3, 4,
    );
    let low = _mm256_set1_epi8(0x0f);
    let a = _mm256_loadu_si256(x.as_ptr().add(j) as *const __m256i);
    let b = _mm256_loadu_si256(w.as_ptr().add(j) as *const __m256i);
    let v = _mm256_xor_si256(a, b);
    let lo = _mm256_and_si256(v, low);
    let hi = _mm256_and_si256(_mm256_srli_epi16::<4>(v), low);
    let bytes = _mm256_add_epi8(_mm256_shuffle_epi8(lut, lo), _mm256_shuffle_epi8(lut, hi));
    _mm256_sad_epu8(bytes, _mm256_setzero_si256())
}

#[inline(always)]
unsafe fn hsum(v: __m256i) -> u32 {
    let s = _mm_add_epi64(_mm256_castsi256_si128(v), _mm256_extracti128_si256::<1>(v));
    (_mm_cvtsi128_si64(s) + _mm_extract_epi64::<1>(s)) as u32
}

impl PopXor for Shuffle {
    #[inline(always)]
    fn run4(x: &[u64], w: [&[u64]; 4]) -> [u32; 4] {
        let n = x.len();
        let whole = n - n % 4;
        let mut out = [0u32; 4];
        if whole > 0 {
            let ws = [&w[0][..n], &w[1][..n], &w[2][..n], &w[3][..n]];
            // SAFETY: every load reads words `j..j + 4 <= whole <= n` of slices holding at
            // least `n` words; the caller is compiled with avx2 (see the module docs).
            unsafe {
                let mut acc = [_mm256_setzero_si256(); 4];
                for j in (0..whole).step_by(4) {
                    for i in 0..4 {
                        acc[i] = _mm256_add_epi64(acc[i], block(x, ws[i], j));
                    }
                }
                for i in 0..4 {
                    out[i] = hsum(acc[i]);
                }
            }
        }
        for (i, o) in out.iter_mut().enumerate() {
            *o += super::conv::Scalar::run1(&x[whole..], &w[i][whole..n]);
        }
        out
    }

    #[inline(always)]
    fn run1(x: &[u64], w: &[u64]) -> u32 {
        let n = x.len();
        let w = &w[..n];
        let whole = n - n % 4;
        let mut s = 0;
        if whole > 0 {
            // SAFETY: as in `run4`.
            unsafe {
                let mut acc = _mm256_setzero_si256();
                for j in (0..whole).step_by(4) {
                    acc = _mm256_add_epi64(acc, block(x, w, j));
                }
                s = hsum(acc);
            }
        }
        s + super::conv::Scalar::run1(&x[whole..], &w[whole..])
    }
}

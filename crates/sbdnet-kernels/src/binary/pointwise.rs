//! Binary pointwise (1x1, stride 1, no padding) convolution with word-major weights, the
//! deployment kernel for the 1x1 layers that hold most of a depthwise-separable network's
//! operations.
//!
//! [`PackedPointwise`] stores the weights transposed, `wt[j][co]` (word `j` of every output
//! channel contiguous, `co` padded to a multiple of 8), so one input word broadcast against
//! 8 consecutive output channels is one vector XOR, one vector popcount and one add. Three
//! implementations, chosen at run time:
//!
//! - AVX-512 with `VPOPCNTQ` (`avx512f` + `avx512vpopcntdq`): 8 output channels per
//!   instruction, 64 output channels kept in 8 registers per pass over the input words;
//! - `POPCNT` (x86_64) and portable `count_ones`: the same loop, one channel at a time.
//!
//! Outputs are the exact `+-1` dot products `cin - 2 * popcount(XOR)` (`i32`), or packed sign
//! bits through per-channel integer thresholds ([`super::SignThreshold`]), compared in the
//! vector registers without forming the integers in memory. Both are tested against the
//! general kernel ([`super::bconv_forward`]) and [`super::threshold_pack`].

use super::{words, BinaryImpl, SignThreshold, SumAffine, WORD_BITS};

/// Output channels per weight row (`cout` is padded to this).
const LANES: usize = 8;

/// Which implementation runs (decided once per process).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PwImpl {
    /// `count_ones` on the baseline target.
    Portable,
    /// Compiled with `POPCNT`.
    Popcnt,
    /// AVX2 (`vpshufb` nibble-table popcounts, 16 output channels per pass, thresholds
    /// compared in registers).
    Avx2,
    /// AVX-512 `VPOPCNTQ`.
    Avx512,
}

impl PwImpl {
    /// The implementation for this process: AVX-512 where the CPU has `avx512f` and
    /// `avx512vpopcntdq` and [`BinaryImpl::current`] is not a fallback, else AVX2 where the
    /// CPU has it, else as [`BinaryImpl::current`] says.
    pub fn current() -> PwImpl {
        match BinaryImpl::current() {
            BinaryImpl::Reference | BinaryImpl::Portable => PwImpl::Portable,
            _ if Self::Avx512.available() => PwImpl::Avx512,
            _ if Self::Avx2.available() => PwImpl::Avx2,
            _ => PwImpl::Popcnt,
        }
    }

    /// Whether this CPU can run it.
    pub fn available(self) -> bool {
        match self {
            PwImpl::Portable => true,
            #[cfg(target_arch = "x86_64")]
            PwImpl::Popcnt => is_x86_feature_detected!("popcnt"),
            #[cfg(target_arch = "x86_64")]
            PwImpl::Avx2 => is_x86_feature_detected!("avx2"),
            #[cfg(target_arch = "x86_64")]
            PwImpl::Avx512 => {
                is_x86_feature_detected!("avx512f")
                    && is_x86_feature_detected!("avx512bw")
                    && is_x86_feature_detected!("avx512dq")
                    && is_x86_feature_detected!("avx512vpopcntdq")
            }
            #[cfg(not(target_arch = "x86_64"))]
            _ => false,
        }
    }
}

/// Pointwise binary weights, transposed word-major, with optional output thresholds.
#[derive(Clone, Debug, PartialEq)]
pub struct PackedPointwise {
    cin: usize,
    cout: usize,
    cpad: usize,
    /// `[words(cin)][cpad]`.
    wt: Vec<u64>,
    /// Thresholds per padded channel (`i64`), and which are flipped (`s < thr`).
    thr: Vec<i64>,
    neg: Vec<bool>,
    /// `neg` as one byte per block of 8 channels.
    neg_mask: Vec<u8>,
    /// Per padded channel, the bound `K` on the popcount `a` (`s = kept - 2a`): the output bit
    /// (`1` = `-1`) is `a > K` for a positive threshold and `a <= K` for a flipped one.
    bound: Vec<i64>,
    /// `-1` where `neg` (as `i64` lanes: the AVX2 kernel flips its comparison with it).
    negv: Vec<i64>,
    /// `bound + 1` as `i32`, with `bound` clamped to `-1..=cin` first (exact for a popcount
    /// in `0..=cin`): the AVX-512 kernel's sign-bit comparison `a - (K + 1) < 0`.
    bound1: Vec<i32>,
    /// Masked (group-sparse) weights only: `[words(cin)][cpad]` bit masks of the kept input
    /// channels (`(x ^ w) & m` is popcounted), else empty.
    mt: Vec<u64>,
    /// Kept input channels per padded channel (`cin` when dense).
    kept: Vec<i64>,
    /// Masked only: `[pass of 64 channels][word]`, bit `i` set when channel block `i` of the
    /// pass keeps any channel of the word; a zero byte skips the word for the whole pass.
    live: Vec<u8>,
    /// At most 32 inputs: `wt` (and `mt`) with the 32 low bits copied into the high half,
    /// so the AVX2 kernel XORs two pixels' words (one in each half) with one instruction.
    wt2: Vec<u64>,
    mt2: Vec<u64>,
}

impl PackedPointwise {
    /// From packed OHWI weights `[cout][words(cin)]` (as [`super::pack_conv_weights`] writes
    /// for a 1x1 kernel).
    pub fn new(cin: usize, cout: usize, w: &[u64]) -> Self {
        let wd = words(cin);
        assert!(w.len() >= cout * wd, "pointwise weights: {} words, need {}", w.len(), cout * wd);
        let cpad = cout.div_ceil(LANES) * LANES;
        let mut wt = vec![0u64; wd * cpad];
        for co in 0..cout {
            for j in 0..wd {
                wt[j * cpad + co] = w[co * wd + j];
            }
        }
        PackedPointwise {
            cin,
            cout,
            cpad,
            wt,
            thr: Vec::new(),
            neg: Vec::new(),
            neg_mask: Vec::new(),
            bound: Vec::new(),
            negv: Vec::new(),
            bound1: Vec::new(),
            mt: Vec::new(),
            kept: vec![cin as i64; cpad],
            live: Vec::new(),
            wt2: Vec::new(),
            mt2: Vec::new(),
        }
        .with_halves()
    }

    /// Fill `wt2` / `mt2` for layers of at most 32 inputs.
    fn with_halves(mut self) -> Self {
        if self.cin <= 32 {
            self.wt2 = self.wt.iter().map(|&w| w | w << 32).collect();
            self.mt2 = self.mt.iter().map(|&m| m | m << 32).collect();
        }
        self
    }

    /// Group-sparse weights: packed OHWI weights `[cout][words(cin)]` and, per weight word,
    /// the bit mask of its kept input channels (`[cout][words(cin)]`). The dot product sums
    /// over kept channels only: `s = kept - 2 * popcount((x ^ w) & m)`; a word whose tile
    /// (64 output channels, one input word) is all pruned is skipped.
    pub fn new_masked(cin: usize, cout: usize, w: &[u64], masks: &[u64]) -> Self {
        let wd = words(cin);
        assert!(masks.len() >= cout * wd, "pointwise masks: {} words, need {}", masks.len(), cout * wd);
        let mut p = Self::new(cin, cout, w);
        let cpad = p.cpad;
        p.mt = vec![0u64; wd * cpad];
        for co in 0..cout {
            let mut n = 0;
            for j in 0..wd {
                let m = masks[co * wd + j];
                p.mt[j * cpad + co] = m;
                n += m.count_ones() as i64;
            }
            p.kept[co] = n;
        }
        let passes = cpad.div_ceil(LANES * 8);
        p.live = vec![0u8; passes * wd];
        for co in 0..cout {
            for j in 0..wd {
                if p.mt[j * cpad + co] != 0 {
                    p.live[(co / (LANES * 8)) * wd + j] |= 1 << ((co / LANES) % 8);
                }
            }
        }
        p.with_halves()
    }

    fn masked(&self) -> bool {
        !self.mt.is_empty()
    }

    /// Attach output thresholds (one per output channel) for [`Self::forward_packed`].
    pub fn with_thresholds(mut self, thr: &[SignThreshold]) -> Self {
        assert_eq!(thr.len(), self.cout);
        self.thr = (0..self.cpad).map(|c| thr.get(c).map_or(0, |t| t.thr as i64)).collect();
        self.neg = (0..self.cpad).map(|c| thr.get(c).is_some_and(|t| t.negative)).collect();
        self.neg_mask =
            self.neg.chunks(LANES).map(|b| b.iter().enumerate().fold(0u8, |m, (l, &n)| m | (n as u8) << l)).collect();
        // With n = kept[c] (cin when dense):
        // s > thr <=> 2a < n - thr <=> a <= ceil((n - thr) / 2) - 1: bit = a > K.
        // s < thr <=> 2a > n - thr <=> a >= floor((n - thr) / 2) + 1: bit = a <= K.
        self.bound = (0..self.cpad)
            .map(|c| {
                let d = self.kept[c] - self.thr[c];
                if self.neg[c] {
                    d.div_euclid(2)
                } else {
                    d.div_euclid(2) + d.rem_euclid(2) - 1
                }
            })
            .collect();
        self.bound1 = self.bound.iter().map(|&k| k.clamp(-1, self.cin as i64) as i32 + 1).collect();
        self.negv = self.neg.iter().map(|&n| -(n as i64)).collect();
        self
    }

    /// Input channels.
    pub fn cin(&self) -> usize {
        self.cin
    }
    /// Output channels.
    pub fn cout(&self) -> usize {
        self.cout
    }

    /// `out[r][co] = cin - 2 * sum_j popcount(x[r][j] ^ w[co][j])` for `rows` pixels of
    /// packed input (`rows * words(cin)` words); `out`: `rows * cout` values.
    pub fn forward(&self, x: &[u64], rows: usize, out: &mut [i32]) {
        self.forward_with(PwImpl::current(), x, rows, out)
    }

    /// [`Self::forward`] with an explicit implementation.
    pub fn forward_with(&self, imp: PwImpl, x: &[u64], rows: usize, out: &mut [i32]) {
        let wd = words(self.cin);
        assert!(x.len() >= rows * wd && out.len() >= rows * self.cout);
        assert!(imp.available(), "{imp:?} is not available on this CPU");
        match imp {
            #[cfg(target_arch = "x86_64")]
            PwImpl::Avx512 => {
                // SAFETY: availability checked above; slices checked against `rows`.
                unsafe { avx512::forward(self, x, rows, out, None) }
            }
            #[cfg(target_arch = "x86_64")]
            // SAFETY: availability checked above; slices checked against `rows`.
            PwImpl::Avx2 => unsafe { avx2::forward(self, x, rows, Some(out), None) },
            #[cfg(target_arch = "x86_64")]
            PwImpl::Popcnt => {
                #[target_feature(enable = "popcnt")]
                unsafe fn popcnt(p: &PackedPointwise, x: &[u64], rows: usize, out: &mut [i32]) {
                    p.scalar(x, rows, out)
                }
                // SAFETY: availability checked above.
                unsafe { popcnt(self, x, rows, out) }
            }
            _ => self.scalar(x, rows, out),
        }
    }

    /// Packed sign bits through the thresholds of [`Self::with_thresholds`]: output bit =
    /// [`SignThreshold::bit`] of the dot product; `out`: `rows * words(cout)` words, padding
    /// bits `0`. `scratch`: at least `cout` values on the non-AVX-512 paths (unused, may be
    /// empty, on AVX-512).
    pub fn forward_packed(&self, x: &[u64], rows: usize, out: &mut [u64], scratch: &mut [i32]) {
        self.forward_packed_with(PwImpl::current(), x, rows, out, scratch)
    }

    /// [`Self::forward`] followed by a per-channel affine with activation ([`SumAffine`]),
    /// written as `f32` in one pass: `out[r][c] = act(scale[c] * s[r][c] + bias[c])`, where
    /// the process runs
    /// [`PwImpl::Avx512`]; returns `false` (writing nothing) elsewhere, and the caller runs
    /// [`Self::forward`] and its own affine.
    pub fn forward_affine(&self, x: &[u64], rows: usize, aff: &SumAffine, out: &mut [f32]) -> bool {
        #[cfg(target_arch = "x86_64")]
        if PwImpl::current() == PwImpl::Avx512 {
            assert!(x.len() >= rows * words(self.cin) && out.len() >= rows * self.cout);
            assert!(aff.scale.len() >= self.cout && aff.bias.len() >= self.cout);
            let aff = avx512::AffOut { aff: *aff, out };
            // SAFETY: `PwImpl::current` is Avx512 only where the CPU has it; slices checked.
            unsafe { avx512::forward_affine(self, x, rows, aff) };
            return true;
        }
        let _ = (x, rows, aff, out);
        false
    }

    /// Whether [`Self::forward_affine_gap`] runs here: AVX-512 with more than 32 inputs, or
    /// AVX2.
    pub fn has_affine_gap(&self) -> bool {
        match PwImpl::current() {
            PwImpl::Avx512 => self.cin > 32,
            PwImpl::Avx2 => true,
            _ => false,
        }
    }

    /// The layer, a per-channel affine with activation, and global average pooling over
    /// `rows` pixels of one image, fused: `out[c] = (sum over r in order of
    /// act(scale[c] * s[r][c] + bias[c])) * (1 / rows)` with `act` 0 none, 1 ReLU, 2 hardtanh
    /// and `s` the integer dot product as `f32`; the same operations, in the same order, as
    /// the affine stage followed by pooling, without writing the `rows x cout` activations.
    /// Requires [`Self::has_affine_gap`].
    pub fn forward_affine_gap(&self, x: &[u64], rows: usize, scale: &[f32], bias: &[f32], act: u8, out: &mut [f32]) {
        assert!(self.has_affine_gap(), "forward_affine_gap needs AVX2, or AVX-512 with > 32 inputs");
        assert!(x.len() >= rows * words(self.cin) && rows > 0);
        assert!(scale.len() >= self.cout && bias.len() >= self.cout && out.len() >= self.cout);
        #[cfg(target_arch = "x86_64")]
        if PwImpl::current() == PwImpl::Avx2 {
            // SAFETY: `has_affine_gap` checked the AVX2 implementation; slices checked above.
            return unsafe { avx2::affine_gap(self, x, rows, scale, bias, act, out) };
        }
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `has_affine_gap` checked AVX-512 with VPOPCNTQ; slices checked above.
        unsafe {
            if self.masked() {
                avx512::affine_gap::<true>(self, x, rows, scale, bias, act, out)
            } else {
                avx512::affine_gap::<false>(self, x, rows, scale, bias, act, out)
            }
        }
    }

    /// [`Self::forward_packed`] with an explicit implementation.
    pub fn forward_packed_with(&self, imp: PwImpl, x: &[u64], rows: usize, out: &mut [u64], scratch: &mut [i32]) {
        let (wd, od) = (words(self.cin), words(self.cout));
        assert!(!self.thr.is_empty(), "forward_packed needs with_thresholds");
        assert!(x.len() >= rows * wd && out.len() >= rows * od);
        assert!(imp.available(), "{imp:?} is not available on this CPU");
        #[cfg(target_arch = "x86_64")]
        if imp == PwImpl::Avx512 {
            // SAFETY: availability checked above; slices checked against `rows`.
            return unsafe { avx512::forward(self, x, rows, &mut [], Some(out)) };
        }
        #[cfg(target_arch = "x86_64")]
        if imp == PwImpl::Avx2 {
            // SAFETY: availability checked above; slices checked against `rows`.
            return unsafe { avx2::forward(self, x, rows, None, Some(out)) };
        }
        assert!(scratch.len() >= self.cout, "forward_packed: scratch holds {}, needs {}", scratch.len(), self.cout);
        let s = &mut scratch[..self.cout];
        for r in 0..rows {
            self.forward_with(imp, &x[r * wd..][..wd], 1, s);
            let o = &mut out[r * od..][..od];
            o.fill(0);
            for (co, &v) in s.iter().enumerate() {
                let t = SignThreshold {
                    thr: self.thr[co].clamp(i32::MIN as i64, i32::MAX as i64) as i32,
                    negative: self.neg[co],
                };
                o[co / WORD_BITS] |= u64::from(t.bit(v)) << (co % WORD_BITS);
            }
        }
    }

    #[inline(always)]
    fn scalar(&self, x: &[u64], rows: usize, out: &mut [i32]) {
        let wd = words(self.cin);
        for r in 0..rows {
            let xr = &x[r * wd..][..wd];
            let o = &mut out[r * self.cout..][..self.cout];
            o.fill(0);
            for (j, &xv) in xr.iter().enumerate() {
                let wrow = &self.wt[j * self.cpad..][..self.cout];
                if self.masked() {
                    let mrow = &self.mt[j * self.cpad..][..self.cout];
                    for ((ov, &w), &m) in o.iter_mut().zip(wrow).zip(mrow) {
                        *ov += ((xv ^ w) & m).count_ones() as i32;
                    }
                } else {
                    for (ov, &w) in o.iter_mut().zip(wrow) {
                        *ov += (xv ^ w).count_ones() as i32;
                    }
                }
            }
            for (v, &n) in o.iter_mut().zip(&self.kept) {
                *v = n as i32 - 2 * *v;
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    #![allow(unsafe_op_in_unsafe_fn)]
    use super::PackedPointwise;
    use crate::binary::{words, WORD_BITS};
    use std::arch::x86_64::*;

    /// Output channels per pass: four registers of four 64-bit lanes.
    const BLOCK: usize = 16;
    /// Input words per run of byte counters (`31 * 8 < 256`).
    const RUN: usize = 31;

    /// Per-byte popcounts of `v` (two nibble-table lookups).
    #[inline(always)]
    unsafe fn popcnt_bytes(v: __m256i) -> __m256i {
        let table = _mm256_setr_epi8(
            0, 1, 1, 2, 1, 2, 2, 3, 1, 2, 2, 3, 2, 3, 3, 4, 0, 1, 1, 2, 1, 2, 2, 3, 1, 2, 2, 3, 2, 3, 3, 4,
        );
        let low = _mm256_set1_epi8(0x0f);
        let lo = _mm256_and_si256(v, low);
        let hi = _mm256_and_si256(_mm256_srli_epi16::<4>(v), low);
        _mm256_add_epi8(_mm256_shuffle_epi8(table, lo), _mm256_shuffle_epi8(table, hi))
    }

    /// Popcounts `a = sum_j popcount((x_j ^ w_j) [& m_j])` of one pixel for channels
    /// `c0 .. c0 + 4 Q` (four per register, as 64-bit lanes). A word whose channel blocks of 8
    /// are all pruned (the `live` bits) is skipped.
    #[inline(always)]
    unsafe fn counts<const Q: usize, const MASKED: bool>(
        p: &PackedPointwise,
        xr: &[u64],
        c0: usize,
        live: &[u8],
    ) -> [__m256i; Q] {
        let wd = xr.len();
        let mut a = [_mm256_setzero_si256(); Q];
        let mut j0 = 0;
        // Which live bits this block's channel blocks of 8 are (`Q / 2` of them).
        let lb = ((1u32 << (Q / 2)) - 1) << ((c0 / 8) % 8);
        while j0 < wd {
            let run = RUN.min(wd - j0);
            let mut b = [_mm256_setzero_si256(); Q];
            for j in j0..j0 + run {
                if MASKED && u32::from(live[j]) & lb == 0 {
                    continue;
                }
                let xv = _mm256_set1_epi64x(xr[j] as i64);
                let w = p.wt.as_ptr().add(j * p.cpad + c0);
                for (q, bq) in b.iter_mut().enumerate() {
                    let mut v = _mm256_xor_si256(xv, _mm256_loadu_si256(w.add(4 * q) as *const __m256i));
                    if MASKED {
                        let m = p.mt.as_ptr().add(j * p.cpad + c0 + 4 * q);
                        v = _mm256_and_si256(v, _mm256_loadu_si256(m as *const __m256i));
                    }
                    *bq = _mm256_add_epi8(*bq, popcnt_bytes(v));
                }
            }
            for (aq, bq) in a.iter_mut().zip(b) {
                *aq = _mm256_add_epi64(*aq, _mm256_sad_epu8(bq, _mm256_setzero_si256()));
            }
            j0 += run;
        }
        a
    }

    /// Channels `c0 .. c0 + 4 Q` of one pixel: output bits through the thresholds
    /// (`(a > K) xor neg`, `4 Q` bits), or `kept - 2 a` into `out` (only the real channels).
    #[inline(always)]
    unsafe fn block<const Q: usize, const MASKED: bool>(
        p: &PackedPointwise,
        xr: &[u64],
        c0: usize,
        live: &[u8],
        out: Option<&mut [i32]>,
    ) -> u64 {
        let a = counts::<Q, MASKED>(p, xr, c0, live);
        if let Some(o) = out {
            let mut v = [0i64; BLOCK];
            for (q, aq) in a.iter().enumerate() {
                _mm256_storeu_si256(v.as_mut_ptr().add(4 * q) as *mut __m256i, *aq);
            }
            let n = (p.cout - c0).min(4 * Q);
            for (i, (ov, &ai)) in o[c0..c0 + n].iter_mut().zip(&v).enumerate() {
                *ov = (p.kept[c0 + i] - 2 * ai) as i32;
            }
            return 0;
        }
        let mut bits = 0u64;
        for (q, aq) in a.iter().enumerate() {
            let k = _mm256_loadu_si256(p.bound.as_ptr().add(c0 + 4 * q) as *const __m256i);
            let n = _mm256_loadu_si256(p.negv.as_ptr().add(c0 + 4 * q) as *const __m256i);
            let b = _mm256_xor_si256(_mm256_cmpgt_epi64(*aq, k), n);
            bits |= (_mm256_movemask_pd(_mm256_castsi256_pd(b)) as u64) << (4 * q);
        }
        bits
    }

    /// See [`PackedPointwise::forward_affine_gap`]: per block of 16 channels, the rows in
    /// order, each row's `act(scale * s + bias)` (multiply, then add) added to two registers
    /// of sums, then `* (1 / rows)`: the affine stage's and the pooling's operations in
    /// their order.
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn affine_gap(
        p: &PackedPointwise,
        x: &[u64],
        rows: usize,
        scale: &[f32],
        bias: &[f32],
        act: u8,
        out: &mut [f32],
    ) {
        if p.masked() {
            gap_run::<true>(p, x, rows, scale, bias, act, out)
        } else {
            gap_run::<false>(p, x, rows, scale, bias, act, out)
        }
    }

    #[inline(always)]
    unsafe fn gap_run<const MASKED: bool>(
        p: &PackedPointwise,
        x: &[u64],
        rows: usize,
        scale: &[f32],
        bias: &[f32],
        act: u8,
        out: &mut [f32],
    ) {
        let wd = words(p.cin);
        let inv = _mm256_set1_ps(1.0 / rows as f32);
        // The even 32-bit halves (the low words of 64-bit lanes) first.
        let even = _mm256_setr_epi32(0, 2, 4, 6, 1, 3, 5, 7);
        let mut c0 = 0;
        while c0 < p.cout {
            let live = if MASKED { &p.live[(c0 / WORD_BITS) * wd..][..wd] } else { &[][..] };
            let n = (p.cout - c0).min(BLOCK);
            // Padding lanes (channels past `cout`) read zeros and are not stored.
            let mut sc = [0f32; BLOCK];
            let mut bi = [0f32; BLOCK];
            let mut kept = [0i32; BLOCK];
            sc[..n].copy_from_slice(&scale[c0..c0 + n]);
            bi[..n].copy_from_slice(&bias[c0..c0 + n]);
            for (k, &v) in kept[..n].iter_mut().zip(&p.kept[c0..c0 + n]) {
                *k = v as i32;
            }
            let ld = |v: &[f32; BLOCK], h: usize| _mm256_loadu_ps(v.as_ptr().add(8 * h));
            let (s, b) = ([ld(&sc, 0), ld(&sc, 1)], [ld(&bi, 0), ld(&bi, 1)]);
            let kv = [_mm256_loadu_si256(kept.as_ptr().cast()), _mm256_loadu_si256(kept.as_ptr().add(8).cast())];
            let mut sum = [_mm256_setzero_ps(); 2];
            let q4 = c0 + BLOCK <= p.cpad;
            for r in 0..rows {
                let xr = &x[r * wd..][..wd];
                let a = if q4 {
                    counts::<4, MASKED>(p, xr, c0, live)
                } else {
                    let a2 = counts::<2, MASKED>(p, xr, c0, live);
                    [a2[0], a2[1], _mm256_setzero_si256(), _mm256_setzero_si256()]
                };
                for h in 0..2 {
                    // Four 64-bit popcounts per register; their low halves as 8 i32.
                    let lo = _mm256_permutevar8x32_epi32(a[2 * h], even);
                    let hi = _mm256_permutevar8x32_epi32(a[2 * h + 1], even);
                    let a32 = _mm256_permute2x128_si256::<0x20>(lo, hi);
                    let sv = _mm256_sub_epi32(kv[h], _mm256_slli_epi32::<1>(a32));
                    let t = crate::act256(_mm256_add_ps(_mm256_mul_ps(s[h], _mm256_cvtepi32_ps(sv)), b[h]), act);
                    sum[h] = _mm256_add_ps(sum[h], t);
                }
            }
            let mut o = [0f32; BLOCK];
            _mm256_storeu_ps(o.as_mut_ptr(), _mm256_mul_ps(sum[0], inv));
            _mm256_storeu_ps(o.as_mut_ptr().add(8), _mm256_mul_ps(sum[1], inv));
            out[c0..c0 + n].copy_from_slice(&o[..n]);
            c0 += BLOCK;
        }
    }

    /// Dot products of `rows` pixels into `out` (`rows * cout`), or packed sign bits
    /// through the thresholds into `bits` (`rows * words(cout)`, padding bits 0).
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn forward(
        p: &PackedPointwise,
        x: &[u64],
        rows: usize,
        out: Option<&mut [i32]>,
        bits: Option<&mut [u64]>,
    ) {
        if p.masked() {
            run::<true>(p, x, rows, out, bits)
        } else {
            run::<false>(p, x, rows, out, bits)
        }
    }

    /// Packed output of a layer with at most 32 inputs, two pixels per 64-bit lane: pixel
    /// `r` in the low half of each word, `r + 1` in the high half, XORed with the weights
    /// copied into both halves (`wt2`); the byte counts of each half summed apart (`vpsadbw`
    /// of the halves masked), then the same thresholds as [`block`].
    #[inline(always)]
    unsafe fn run_halves<const MASKED: bool>(p: &PackedPointwise, x: &[u64], rows: usize, bits: &mut [u64]) {
        let od = words(p.cout);
        let low = _mm256_set1_epi64x(0xFFFF_FFFF);
        let zero = _mm256_setzero_si256();
        let mut r = 0;
        while r < rows {
            let two = r + 1 < rows;
            let x2 = x[r] | if two { x[r + 1] << 32 } else { 0 };
            let xv = _mm256_set1_epi64x(x2 as i64);
            let mut words2 = [0u64; 2];
            let mut c0 = 0;
            while c0 < p.cpad {
                let q = if c0 + BLOCK <= p.cpad { 4 } else { 2 };
                let live = if MASKED { u32::from(p.live[c0 / WORD_BITS]) } else { 0 };
                let lb = ((1u32 << (q / 2)) - 1) << ((c0 / 8) % 8);
                let skip = MASKED && live & lb == 0;
                let mut b = [0u64; 2];
                for qi in 0..q {
                    let (lo, hi) = if skip {
                        (zero, zero)
                    } else {
                        let mut v = _mm256_xor_si256(xv, _mm256_loadu_si256(p.wt2.as_ptr().add(c0 + 4 * qi).cast()));
                        if MASKED {
                            v = _mm256_and_si256(v, _mm256_loadu_si256(p.mt2.as_ptr().add(c0 + 4 * qi).cast()));
                        }
                        let c = popcnt_bytes(v);
                        (
                            _mm256_sad_epu8(_mm256_and_si256(c, low), zero),
                            _mm256_sad_epu8(_mm256_andnot_si256(low, c), zero),
                        )
                    };
                    let k = _mm256_loadu_si256(p.bound.as_ptr().add(c0 + 4 * qi) as *const __m256i);
                    let n = _mm256_loadu_si256(p.negv.as_ptr().add(c0 + 4 * qi) as *const __m256i);
                    for (h, a) in [lo, hi].into_iter().enumerate() {
                        let t = _mm256_xor_si256(_mm256_cmpgt_epi64(a, k), n);
                        b[h] |= (_mm256_movemask_pd(_mm256_castsi256_pd(t)) as u64) << (4 * qi);
                    }
                }
                for h in 0..2 {
                    words2[h] |= b[h] << (c0 % WORD_BITS);
                }
                c0 += 4 * q;
                if c0 % WORD_BITS == 0 || c0 >= p.cpad {
                    let i = (c0 - 1) / WORD_BITS;
                    if i < od {
                        let keep = if (i + 1) * WORD_BITS > p.cout { (1u64 << (p.cout % WORD_BITS)) - 1 } else { !0 };
                        bits[r * od + i] = words2[0] & keep;
                        if two {
                            bits[(r + 1) * od + i] = words2[1] & keep;
                        }
                    }
                    words2 = [0; 2];
                }
            }
            r += 2;
        }
    }

    #[inline(always)]
    unsafe fn run<const MASKED: bool>(
        p: &PackedPointwise,
        x: &[u64],
        rows: usize,
        mut out: Option<&mut [i32]>,
        mut bits: Option<&mut [u64]>,
    ) {
        if p.cin <= 32 && out.is_none() {
            if let Some(bw) = bits {
                return run_halves::<MASKED>(p, x, rows, bw);
            }
        }
        let (wd, od) = (words(p.cin), words(p.cout));
        for r in 0..rows {
            let xr = &x[r * wd..][..wd];
            let mut o = out.as_deref_mut().map(|o| &mut o[r * p.cout..][..p.cout]);
            let mut word = 0u64;
            let mut c0 = 0;
            while c0 < p.cpad {
                let live = if MASKED { &p.live[(c0 / WORD_BITS) * wd..][..wd] } else { &[][..] };
                let q = if c0 + BLOCK <= p.cpad { 4 } else { 2 };
                let b = if q == 4 {
                    block::<4, MASKED>(p, xr, c0, live, o.as_deref_mut())
                } else {
                    block::<2, MASKED>(p, xr, c0, live, o.as_deref_mut())
                };
                word |= b << (c0 % WORD_BITS);
                c0 += 4 * q;
                if let Some(bw) = bits.as_deref_mut() {
                    if c0 % WORD_BITS == 0 || c0 >= p.cpad {
                        let i = (c0 - 1) / WORD_BITS;
                        if i < od {
                            // Padding channels (`cout..cpad`) have `K = 0`, `neg = false`:
                            // cleared here.
                            let keep =
                                if (i + 1) * WORD_BITS > p.cout { (1u64 << (p.cout % WORD_BITS)) - 1 } else { !0 };
                            bw[r * od + i] = word & keep;
                        }
                        word = 0;
                    }
                }
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    #![allow(unsafe_op_in_unsafe_fn)]
    use super::{PackedPointwise, LANES};
    use crate::binary::{words, SumAffine};
    use std::arch::x86_64::*;

    /// Channel blocks of 8 per pass: one output word of 64 channels.
    const REGS: usize = 8;

    /// Dot products of `rows` pixels: into `out_i32` (`rows * cout`), or, with `bits`, packed
    /// through the thresholds (popcount bounds, compared in registers). Output channels go in
    /// passes of 64 (one output word); within a pass the bounds stay in registers and every
    /// pixel's accumulators live in 8 registers.
    #[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vpopcntdq")]
    pub(super) unsafe fn forward(
        p: &PackedPointwise,
        x: &[u64],
        rows: usize,
        out_i32: &mut [i32],
        bits: Option<&mut [u64]>,
    ) {
        match (p.cin <= 32, p.masked()) {
            (true, false) => forward32::<false, false>(p, x, rows, out_i32, bits, None),
            (true, true) => forward32::<true, false>(p, x, rows, out_i32, bits, None),
            (false, false) => forward64::<false, false>(p, x, rows, out_i32, bits, None),
            (false, true) => forward64::<true, false>(p, x, rows, out_i32, bits, None),
        }
    }

    /// See [`PackedPointwise::forward_affine`]: the kernels' integer store replaced by the
    /// affine (separate instantiations, so the other outputs' code is unchanged).
    #[target_feature(enable = "avx512f,avx512vpopcntdq")]
    pub(super) unsafe fn forward_affine(p: &PackedPointwise, x: &[u64], rows: usize, aff: AffOut) {
        let aff = Some(aff);
        match (p.cin <= 32, p.masked()) {
            (true, false) => forward32::<false, true>(p, x, rows, &mut [], None, aff),
            (true, true) => forward32::<true, true>(p, x, rows, &mut [], None, aff),
            (false, false) => forward64::<false, true>(p, x, rows, &mut [], None, aff),
            (false, true) => forward64::<true, true>(p, x, rows, &mut [], None, aff),
        }
    }

    /// The affine output of [`PackedPointwise::forward_affine`].
    pub(super) struct AffOut<'a> {
        pub aff: SumAffine<'a>,
        pub out: &'a mut [f32],
    }

    impl AffOut<'_> {
        /// The affine of the sums `s` in lanes `m` (channels from `c0`), stored at row `r` of
        /// `cout` channels.
        #[inline(always)]
        unsafe fn store(&mut self, r: usize, cout: usize, c0: usize, m: __mmask16, s: __m512) {
            let y = self.aff.apply16(c0, m, s);
            _mm512_mask_storeu_ps(self.out.as_mut_ptr().add(r * cout + c0), m, y);
        }
    }

    /// See [`PackedPointwise::forward_affine_gap`]: per pass of 64 channels, the pooled sums
    /// stay in four 16-float registers over all rows.
    #[target_feature(enable = "avx512f,avx512vpopcntdq")]
    pub(super) unsafe fn affine_gap<const MASKED: bool>(
        p: &PackedPointwise,
        x: &[u64],
        rows: usize,
        scale: &[f32],
        bias: &[f32],
        act: u8,
        out: &mut [f32],
    ) {
        let wd = words(p.cin);
        let blocks = p.cpad / LANES;
        let wt = p.wt.as_ptr();
        let inv = _mm512_set1_ps(1.0 / rows as f32);
        // Scale, bias and kept count of 16 channels from `c0`, zero past cout.
        let lanes16 = |v: &[f32], c0: usize| -> __m512 {
            let l: [f32; 16] = std::array::from_fn(|i| v.get(c0 + i).copied().unwrap_or(0.0));
            _mm512_loadu_ps(l.as_ptr())
        };
        const PAIRS: usize = REGS / 2;
        let mut b0 = 0;
        while b0 < blocks {
            let nb = REGS.min(blocks - b0);
            let np = nb.div_ceil(2);
            // The affine runs on 16 channels (two blocks) per register.
            let mut sc = [_mm512_setzero_ps(); PAIRS];
            let mut bi = [_mm512_setzero_ps(); PAIRS];
            let mut kept = [_mm512_setzero_si512(); PAIRS];
            for k in 0..np {
                let c0 = (b0 + 2 * k) * LANES;
                sc[k] = lanes16(scale, c0);
                bi[k] = lanes16(bias, c0);
                let n: [i32; 16] = std::array::from_fn(|i| p.kept.get(c0 + i).map_or(0, |&v| v as i32));
                kept[k] = _mm512_loadu_si512(n.as_ptr() as *const _);
            }
            let wblk = wt.add(b0 * LANES);
            let mblk = p.mt.as_ptr().wrapping_add(b0 * LANES);
            let live = if MASKED { &p.live[(b0 / REGS) * wd..][..wd] } else { &[] };
            let mut pool = [_mm512_setzero_ps(); PAIRS];
            for r in 0..rows {
                let xr = x.as_ptr().add(r * wd);
                let mut acc = [_mm512_setzero_si512(); REGS];
                for j in 0..wd {
                    if MASKED && *live.get_unchecked(j) == 0 {
                        continue; // the whole tile is pruned
                    }
                    let xv = _mm512_set1_epi64(*xr.add(j) as i64);
                    let wrow = wblk.add(j * p.cpad);
                    for (i, a) in acc.iter_mut().enumerate().take(nb) {
                        let w = _mm512_loadu_si512(wrow.add(i * LANES) as *const _);
                        let d = if MASKED {
                            xor_and(xv, w, _mm512_loadu_si512(mblk.add(j * p.cpad + i * LANES) as *const _))
                        } else {
                            _mm512_xor_si512(xv, w)
                        };
                        *a = _mm512_add_epi64(*a, _mm512_popcnt_epi64(d));
                    }
                }
                for k in 0..np {
                    // Popcounts of blocks 2k and 2k+1 as 16 int32 lanes.
                    let a = _mm512_inserti64x4::<1>(
                        _mm512_castsi256_si512(_mm512_cvtepi64_epi32(acc[2 * k])),
                        _mm512_cvtepi64_epi32(acc[2 * k + 1]),
                    );
                    let sv = _mm512_sub_epi32(kept[k], _mm512_slli_epi32::<1>(a));
                    let y = _mm512_add_ps(_mm512_mul_ps(sc[k], _mm512_cvtepi32_ps(sv)), bi[k]);
                    let y = crate::act512(y, act);
                    pool[k] = _mm512_add_ps(pool[k], y);
                }
            }
            for (k, &pv) in pool.iter().enumerate().take(np) {
                let mut l = [0f32; 16];
                _mm512_storeu_ps(l.as_mut_ptr(), _mm512_mul_ps(pv, inv));
                let c0 = (b0 + 2 * k) * LANES;
                let m = p.cout.saturating_sub(c0).min(16);
                out[c0..c0 + m].copy_from_slice(&l[..m]);
            }
            b0 += nb;
        }
    }

    /// Lanes where the popcount `a <= K`, given `k1 = K + 1` (16 dwords): the sign bit of
    /// `a - (K + 1)` by `vpmovd2m`, which runs on port 0, beside the port-5 `VPOPCNT`s, where
    /// a compare into a mask register would compete with them.
    #[inline(always)]
    unsafe fn at_most(a: __m512i, k1: __m512i) -> __mmask16 {
        _mm512_movepi32_mask(_mm512_sub_epi32(a, k1))
    }

    /// `(x ^ w) & m` in one instruction (`vpternlogq` truth table of `(a ^ b) & c`).
    #[inline(always)]
    unsafe fn xor_and(x: __m512i, w: __m512i, m: __m512i) -> __m512i {
        _mm512_ternarylogic_epi64::<0x28>(x, w, m)
    }

    /// At most 32 input channels: half of every input word is padding, so the XOR and the
    /// popcount run on 32-bit lanes (`VPOPCNTD`), 16 output channels per instruction.
    #[inline(always)]
    unsafe fn forward32<const MASKED: bool, const AFF: bool>(
        p: &PackedPointwise,
        x: &[u64],
        rows: usize,
        out_i32: &mut [i32],
        mut bits: Option<&mut [u64]>,
        mut aff: Option<AffOut>,
    ) {
        const L: usize = 16;
        let od = words(p.cout);
        let blocks = p.cout.div_ceil(L);
        // Low halves of the word-major weights and masks (one word per output channel).
        let w = |co: usize| -> i32 {
            if co < p.cout {
                p.wt[co] as u32 as i32
            } else {
                0
            }
        };
        let m = |co: usize| -> i32 {
            if co < p.cout && MASKED {
                p.mt[co] as u32 as i32
            } else {
                0
            }
        };
        let mut b0 = 0;
        while b0 < blocks {
            let nb = 4.min(blocks - b0);
            let mut wv = [_mm512_setzero_si512(); 4];
            let mut mv = [_mm512_setzero_si512(); 4];
            let mut kept = [_mm512_setzero_si512(); 4];
            let mut bound = [_mm512_setzero_si512(); 4];
            let mut valid = [0u16; 4];
            let (mut pos_word, mut valid_word) = (0u64, 0u64);
            for i in 0..nb {
                let c0 = (b0 + i) * L;
                let lane: [i32; L] = std::array::from_fn(|l| w(c0 + l));
                wv[i] = _mm512_loadu_si512(lane.as_ptr() as *const _);
                let lane: [i32; L] = std::array::from_fn(|l| m(c0 + l));
                mv[i] = _mm512_loadu_si512(lane.as_ptr() as *const _);
                let lane: [i32; L] = std::array::from_fn(|l| p.kept.get(c0 + l).map_or(0, |&n| n as i32));
                kept[i] = _mm512_loadu_si512(lane.as_ptr() as *const _);
                let m = p.cout.saturating_sub(c0).min(L);
                valid[i] = if m == L { u16::MAX } else { (1u16 << m) - 1 };
                if bits.is_some() {
                    // `K + 1` ([`PackedPointwise::bound1`]; lanes past the padding: 0).
                    let kb: [i32; L] = std::array::from_fn(|l| p.bound1.get(c0 + l).copied().unwrap_or(0));
                    bound[i] = _mm512_loadu_si512(kb.as_ptr() as *const _);
                    let pos = (0..m).fold(0u64, |acc, l| acc | u64::from(!p.neg[c0 + l]) << l);
                    pos_word |= pos << (L * i);
                    valid_word |= u64::from(valid[i]) << (L * i);
                }
            }
            for r in 0..rows {
                let xv = _mm512_set1_epi32(*x.get_unchecked(r) as u32 as i32);
                let mut acc = [_mm512_setzero_si512(); 4];
                for i in 0..nb {
                    let d = if MASKED { xor_and(xv, wv[i], mv[i]) } else { _mm512_xor_si512(xv, wv[i]) };
                    acc[i] = _mm512_popcnt_epi32(d);
                }
                match bits.as_deref_mut() {
                    Some(b) => {
                        let word = if nb == 4 {
                            let m0 = at_most(acc[0], bound[0]);
                            let m1 = at_most(acc[1], bound[1]);
                            let m2 = at_most(acc[2], bound[2]);
                            let m3 = at_most(acc[3], bound[3]);
                            let lo = _mm512_kunpackw(m1 as u32, m0 as u32);
                            let hi = _mm512_kunpackw(m3 as u32, m2 as u32);
                            _mm512_kunpackd(hi as u64, lo as u64)
                        } else {
                            let mut word = 0u64;
                            for i in 0..nb {
                                word |= u64::from(at_most(acc[i], bound[i])) << (L * i);
                            }
                            word
                        };
                        *b.get_unchecked_mut(r * od + b0 / 4) = (word ^ pos_word) & valid_word;
                    }
                    None => {
                        for i in 0..nb {
                            let sv = _mm512_sub_epi32(kept[i], _mm512_slli_epi32::<1>(acc[i]));
                            if AFF {
                                if let Some(a) = aff.as_mut() {
                                    a.store(r, p.cout, (b0 + i) * L, valid[i], _mm512_cvtepi32_ps(sv));
                                }
                                continue;
                            }
                            let o = out_i32.as_mut_ptr().add(r * p.cout + (b0 + i) * L);
                            _mm512_mask_storeu_epi32(o, valid[i], sv);
                        }
                    }
                }
            }
            b0 += nb;
        }
    }

    /// Any input width: 64-bit lanes, 8 output channels per instruction.
    #[inline(always)]
    unsafe fn forward64<const MASKED: bool, const AFF: bool>(
        p: &PackedPointwise,
        x: &[u64],
        rows: usize,
        out_i32: &mut [i32],
        mut bits: Option<&mut [u64]>,
        mut aff: Option<AffOut>,
    ) {
        let wd = words(p.cin);
        let od = words(p.cout);
        let blocks = p.cpad / LANES;
        let (wt, mt) = (p.wt.as_ptr(), p.mt.as_ptr());
        let mut b0 = 0;
        while b0 < blocks {
            let nb = REGS.min(blocks - b0);
            let mut bound = [_mm512_setzero_si512(); REGS];
            // Full passes: `K + 1` (K clamped to -1..=cin, exact for a popcount in 0..=cin) as
            // 32-bit lanes, channels of blocks 2q and 2q + 1 in register q.
            let mut bound1 = [_mm512_setzero_si512(); REGS / 2];
            // Over the pass's output word: lanes whose bit is `(a <= K) XOR 1`, valid lanes.
            let (mut pos_word, mut valid_word) = (0u64, 0u64);
            if bits.is_some() && nb == REGS {
                for (q, b1) in bound1.iter_mut().enumerate() {
                    *b1 = _mm512_loadu_si512(p.bound1[(b0 + 2 * q) * LANES..][..2 * LANES].as_ptr() as *const _);
                }
            }
            if bits.is_some() {
                for (i, bd) in bound.iter_mut().enumerate().take(nb) {
                    if nb < REGS {
                        // A partial pass compares the 64-bit popcounts with `K` directly.
                        *bd = _mm512_loadu_si512(p.bound.as_ptr().add((b0 + i) * LANES) as *const _);
                    }
                    let m = p.cout.saturating_sub((b0 + i) * LANES).min(LANES);
                    let valid = if m == LANES { 0xff } else { (1u8 << m) - 1 };
                    pos_word |= u64::from(!p.neg_mask[b0 + i] & valid) << (8 * i);
                    valid_word |= u64::from(valid) << (8 * i);
                }
            }
            let wblk = wt.add(b0 * LANES);
            let mut kept = [_mm512_setzero_si512(); REGS];
            for (i, k) in kept.iter_mut().enumerate().take(nb) {
                *k = _mm512_loadu_si512(p.kept.as_ptr().add((b0 + i) * LANES) as *const _);
            }
            let live = if MASKED { &p.live[(b0 / REGS) * wd..][..wd] } else { &[] };
            for r in 0..rows {
                let xr = x.as_ptr().add(r * wd);
                let mut acc = [_mm512_setzero_si512(); REGS];
                if MASKED {
                    let mblk = mt.add(b0 * LANES);
                    for j in 0..wd {
                        if *live.get_unchecked(j) == 0 {
                            continue; // the whole tile is pruned
                        }
                        let xv = _mm512_set1_epi64(*xr.add(j) as i64);
                        let (wrow, mrow) = (wblk.add(j * p.cpad), mblk.add(j * p.cpad));
                        for (i, a) in acc.iter_mut().enumerate().take(nb) {
                            let w = _mm512_loadu_si512(wrow.add(i * LANES) as *const _);
                            let m = _mm512_loadu_si512(mrow.add(i * LANES) as *const _);
                            *a = _mm512_add_epi64(*a, _mm512_popcnt_epi64(xor_and(xv, w, m)));
                        }
                    }
                } else {
                    // The first word sets the accumulators, the others add.
                    let xv = _mm512_set1_epi64(*xr as i64);
                    for (i, a) in acc.iter_mut().enumerate().take(nb) {
                        let w = _mm512_loadu_si512(wblk.add(i * LANES) as *const _);
                        *a = _mm512_popcnt_epi64(_mm512_xor_si512(xv, w));
                    }
                    for j in 1..wd {
                        let xv = _mm512_set1_epi64(*xr.add(j) as i64);
                        let wrow = wblk.add(j * p.cpad);
                        for (i, a) in acc.iter_mut().enumerate().take(nb) {
                            let w = _mm512_loadu_si512(wrow.add(i * LANES) as *const _);
                            *a = _mm512_add_epi64(*a, _mm512_popcnt_epi64(_mm512_xor_si512(xv, w)));
                        }
                    }
                }
                match bits.as_deref_mut() {
                    Some(b) => {
                        // bit = (a <= K) XOR positive, masked to the valid lanes
                        let word = if nb == REGS {
                            // Two blocks' popcounts (below 2^32: the high halves are zero) as
                            // 16 dwords by one permute, then compared by `at_most` (8 compares
                            // and 7 mask merges, all on port 5 with `VPOPCNTQ`, become 4
                            // permutes, 4 `at_most` and 3 merges).
                            let even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
                            let mut m = [0 as __mmask16; REGS / 2];
                            for (q, mq) in m.iter_mut().enumerate() {
                                *mq = at_most(_mm512_permutex2var_epi32(acc[2 * q], even, acc[2 * q + 1]), bound1[q]);
                            }
                            let lo = _mm512_kunpackw(m[1] as u32, m[0] as u32);
                            let hi = _mm512_kunpackw(m[3] as u32, m[2] as u32);
                            _mm512_kunpackd(hi as u64, lo as u64)
                        } else {
                            let mut word = 0u64;
                            for i in 0..nb {
                                word |= u64::from(_mm512_cmple_epi64_mask(acc[i], bound[i])) << (8 * i);
                            }
                            word
                        };
                        *b.get_unchecked_mut(r * od + b0 / REGS) = (word ^ pos_word) & valid_word;
                    }
                    None => {
                        for (i, a) in acc.iter().enumerate().take(nb) {
                            let s = _mm512_sub_epi64(kept[i], _mm512_slli_epi64::<1>(*a));
                            let co0 = (b0 + i) * LANES;
                            let m = p.cout.saturating_sub(co0).min(LANES);
                            let v = _mm512_cvtepi64_epi32(s);
                            if AFF {
                                if let Some(a) = aff.as_mut() {
                                    let f = _mm512_cvtepi32_ps(_mm512_zextsi256_si512(v));
                                    a.store(r, p.cout, co0, ((1u32 << m) - 1) as __mmask16, f);
                                }
                                continue;
                            }
                            if m == LANES {
                                _mm256_storeu_si256(out_i32.as_mut_ptr().add(r * p.cout + co0) as *mut __m256i, v);
                            } else {
                                let mut tmp = [0i32; LANES];
                                _mm256_storeu_si256(tmp.as_mut_ptr() as *mut __m256i, v);
                                out_i32[r * p.cout + co0..][..m].copy_from_slice(&tmp[..m]);
                            }
                        }
                    }
                }
            }
            b0 += nb;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The machine's popcount limit: 8 independent `VPOPCNTQ` + add chains, best of 2000
    /// short runs. `cargo test --release -p sbdnet-kernels popcount_limit -- --ignored --nocapture`
    #[test]
    #[ignore]
    #[cfg(target_arch = "x86_64")]
    fn popcount_limit() {
        use std::arch::x86_64::*;
        #[target_feature(enable = "avx512f,avx512vpopcntdq")]
        unsafe fn run(n: usize) -> i64 {
            let mut a = [_mm512_set1_epi64(1); 8];
            let mut x = _mm512_set1_epi64(0x5555);
            let one = _mm512_set1_epi64(1);
            let w: [__m512i; 8] = core::array::from_fn(|i| _mm512_set1_epi64(i as i64 * 0x1234567));
            for _ in 0..n {
                x = _mm512_add_epi64(x, one);
                for i in 0..8 {
                    a[i] = _mm512_add_epi64(a[i], _mm512_popcnt_epi64(_mm512_xor_si512(w[i], x)));
                }
            }
            a.iter().map(|v| _mm512_reduce_add_epi64(*v)).sum()
        }
        if !PwImpl::Avx512.available() {
            if PwImpl::Avx2.available() {
                avx2_limit();
            } else {
                eprintln!("neither AVX-512 nor AVX2 here (or a forced fallback): nothing to measure");
            }
            return;
        }
        let n = 200_000;
        let mut best = f64::MAX;
        for _ in 0..2000 {
            let t = std::time::Instant::now();
            // SAFETY: availability checked above.
            std::hint::black_box(unsafe { run(n) });
            best = best.min(t.elapsed().as_secs_f64());
        }
        println!("VPOPCNTQ limit: {:.0} G binary ops/s per core", (n * 8 * 512) as f64 / best / 1e9);
    }
    /// The AVX2 form of the limit: 8 independent chains of XOR, nibble-table popcount
    /// (`vpshufb` twice) and byte add per 256 bits, best of 2000 short runs.
    #[cfg(target_arch = "x86_64")]
    fn avx2_limit() {
        use std::arch::x86_64::*;
        #[target_feature(enable = "avx2")]
        unsafe fn run(n: usize) -> i64 {
            let table = _mm256_setr_epi8(
                0, 1, 1, 2, 1, 2, 2, 3, 1, 2, 2, 3, 2, 3, 3, 4, 0, 1, 1, 2, 1, 2, 2, 3, 1, 2, 2, 3, 2, 3, 3, 4,
            );
            let low = _mm256_set1_epi8(0x0f);
            let mut a = [_mm256_setzero_si256(); 8];
            let mut x = _mm256_set1_epi64x(0x5555);
            let one = _mm256_set1_epi64x(1);
            let w: [__m256i; 8] = core::array::from_fn(|i| _mm256_set1_epi64x(i as i64 * 0x1234567));
            for _ in 0..n {
                x = _mm256_add_epi64(x, one);
                for i in 0..8 {
                    let v = _mm256_xor_si256(w[i], x);
                    let lo = _mm256_shuffle_epi8(table, _mm256_and_si256(v, low));
                    let hi = _mm256_shuffle_epi8(table, _mm256_and_si256(_mm256_srli_epi16::<4>(v), low));
                    a[i] = _mm256_add_epi8(a[i], _mm256_add_epi8(lo, hi));
                }
            }
            let mut t = [0i64; 4];
            let mut sum = 0;
            for v in a {
                _mm256_storeu_si256(t.as_mut_ptr().cast(), _mm256_sad_epu8(v, _mm256_setzero_si256()));
                sum += t.iter().sum::<i64>();
            }
            sum
        }
        let n = 200_000;
        let mut best = f64::MAX;
        for _ in 0..2000 {
            let t = std::time::Instant::now();
            // SAFETY: the caller checked AVX2.
            std::hint::black_box(unsafe { run(n) });
            best = best.min(t.elapsed().as_secs_f64());
        }
        println!("AVX2 nibble-table popcount limit: {:.0} G binary ops/s per core", (n * 8 * 256) as f64 / best / 1e9);
    }
    use crate::binary::{bconv_forward_with, pack_signs, threshold_pack};

    /// Random packed inputs (`rows x cin`) and weights (`cout x cin`), drawn in that order.
    fn random_signs(rng: &mut Rng, rows: usize, cin: usize, cout: usize) -> (Vec<u64>, Vec<u64>) {
        let xf: Vec<f32> = (0..rows * cin).map(|_| rng.normal()).collect();
        let wf: Vec<f32> = (0..cout * cin).map(|_| rng.normal()).collect();
        let (mut x, mut w) = (vec![0u64; rows * words(cin)], vec![0u64; cout * words(cin)]);
        pack_signs(&xf, cin, &mut x);
        pack_signs(&wf, cin, &mut w);
        (x, w)
    }

    /// The fused affine + pooling equals the affine stage then pooling, bit for bit.
    #[test]
    fn affine_gap_equals_stage_then_pooling() {
        let mut rng = Rng::new(9);
        for &(rows, cin, cout) in &[(49usize, 128usize, 256usize), (9, 100, 70), (4, 33, 9), (1, 64, 1)] {
            let (x, w) = random_signs(&mut rng, rows, cin, cout);
            // Dense, and masked with some words pruned for every channel (skipped tiles).
            let wd = words(cin);
            let masks: Vec<u64> = (0..cout * wd).map(|i| if i % wd == 1 { 0 } else { rng.next_u64() | 1 }).collect();
            for p in [PackedPointwise::new(cin, cout, &w), PackedPointwise::new_masked(cin, cout, &w, &masks)] {
                if !p.has_affine_gap() {
                    return;
                }
                let mut s = vec![0i32; rows * cout];
                p.forward_with(PwImpl::Portable, &x, rows, &mut s);
                let scale: Vec<f32> = (0..cout).map(|_| rng.normal() * 0.3).collect();
                let bias: Vec<f32> = (0..cout).map(|_| rng.normal()).collect();
                for act in 0..3u8 {
                    // Hardtanh as max then min (NaN maps to -1, unlike clamp).
                    #[allow(clippy::manual_clamp)]
                    let f = |v: f32| match act {
                        1 => v.max(0.0),
                        2 => v.max(-1.0).min(1.0),
                        _ => v,
                    };
                    let mut want = vec![0.0f32; cout];
                    for r in 0..rows {
                        for c in 0..cout {
                            want[c] += f(scale[c] * s[r * cout + c] as f32 + bias[c]);
                        }
                    }
                    let inv = 1.0 / rows as f32;
                    want.iter_mut().for_each(|v| *v *= inv);
                    let mut got = vec![f32::NAN; cout];
                    p.forward_affine_gap(&x, rows, &scale, &bias, act, &mut got);
                    assert_eq!(got, want, "{rows}x{cin}->{cout} act {act} masked {}", p.masked());
                }
            }
        }
    }
    use crate::conv::ConvGeom;
    use crate::rng::Rng;

    /// The affine applied as the sums are stored equals the affine on the integer sums.
    #[test]
    fn forward_affine_equals_the_affine_on_the_sums() {
        let mut rng = Rng::new(13);
        for &(rows, cin, cout) in &[(7, 1, 1), (5, 32, 64), (6, 17, 200), (3, 31, 9), (9, 64, 128), (4, 200, 257)] {
            let (x, w) = random_signs(&mut rng, rows, cin, cout);
            let wd = words(cin);
            let masks: Vec<u64> = (0..cout * wd).map(|_| rng.next_u64() | 1).collect();
            let scale: Vec<f32> = (0..cout).map(|c| if c % 5 == 0 { -0.7 } else { rng.normal() }).collect();
            let bias: Vec<f32> = (0..cout).map(|_| rng.normal()).collect();
            for p in [PackedPointwise::new(cin, cout, &w), PackedPointwise::new_masked(cin, cout, &w, &masks)] {
                let mut s = vec![0i32; rows * cout];
                p.forward_with(PwImpl::Portable, &x, rows, &mut s);
                for act in 0..3u8 {
                    let mut got = vec![f32::NAN; rows * cout];
                    let aff = SumAffine { scale: &scale, bias: &bias, act };
                    if !p.forward_affine(&x, rows, &aff, &mut got) {
                        eprintln!("no AVX-512 here (or a forced fallback): nothing to compare");
                        return;
                    }
                    for (i, (&g, &sv)) in got.iter().zip(&s).enumerate() {
                        let t = scale[i % cout] * sv as f32 + bias[i % cout];
                        #[allow(clippy::manual_clamp)]
                        let e = match act {
                            1 => t.max(0.0),
                            2 => t.max(-1.0).min(1.0),
                            _ => t,
                        };
                        assert_eq!(g, e, "{rows}x{cin}->{cout} act {act} masked {} at {i}", p.masked());
                    }
                }
            }
        }
    }

    #[test]
    fn pointwise_matches_the_general_kernel() {
        let mut rng = Rng::new(5);
        for &(rows, cin, cout) in
            &[(7, 1, 1), (5, 32, 64), (6, 17, 200), (3, 31, 9), (9, 64, 128), (3, 100, 70), (4, 200, 257), (2, 1024, 9)]
        {
            let (x, w) = random_signs(&mut rng, rows, cin, cout);
            let g = ConvGeom::new(1, 1, rows, cin, cout, 1, 1, 0, 1).unwrap();
            let mut want = vec![0i32; rows * cout];
            bconv_forward_with(BinaryImpl::Reference, &g, &x, &w, &mut want);
            // Small thresholds, and some far outside the popcount's range (every bound clamps).
            let t = |c: usize| match c % 11 {
                9 => 1000,
                10 => -1000,
                _ => (c as i32 % 7) - 3,
            };
            let thr: Vec<SignThreshold> =
                (0..cout).map(|c| SignThreshold { thr: t(c), negative: c % 3 == 0 }).collect();
            let mut want_bits = vec![0u64; rows * words(cout)];
            threshold_pack(&want, cout, &thr, &mut want_bits);
            let p = PackedPointwise::new(cin, cout, &w).with_thresholds(&thr);
            for imp in [PwImpl::Portable, PwImpl::Popcnt, PwImpl::Avx2, PwImpl::Avx512] {
                if !imp.available() {
                    continue;
                }
                let mut got = vec![0i32; rows * cout];
                p.forward_with(imp, &x, rows, &mut got);
                assert_eq!(got, want, "{imp:?} {rows}x{cin}->{cout}");
                let mut bits = vec![u64::MAX; rows * words(cout)];
                let mut s = vec![0i32; cout];
                p.forward_packed_with(imp, &x, rows, &mut bits, &mut s);
                assert_eq!(bits, want_bits, "{imp:?} packed {rows}x{cin}->{cout}");
            }
        }
    }
}

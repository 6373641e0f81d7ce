//! Sparse binary pointwise convolution: weights in `{-1, 0, +1}` where zeros come in whole
//! groups of `G` consecutive input channels (Sparse BD-Net), on bit-packed inputs.
//!
//! Zero groups are skipped, not multiplied by zero: each output channel keeps only the input
//! words that hold a surviving group, each with a bit mask of its surviving channels, so
//!
//! ```text
//! s[co] = n_kept[co] - 2 * sum over kept words j of popcount((x[j] XOR w[co][j]) AND m[co][j])
//! ```
//!
//! where `n_kept` counts the surviving input channels of `co`. A word whose groups are all
//! pruned costs nothing; with `G >= 64` (or `G` dividing 64 and whole words pruned) the work
//! falls in proportion to the sparsity.
//!
//! That per-channel list runs one channel at a time. Where the CPU has AVX-512 `VPOPCNTQ`
//! the layer runs instead as a masked [`PackedPointwise`] (word-major, 8 or 16 output
//! channels per instruction, `(x ^ w) & m` in one `vpternlogq`): there the unit that is
//! skipped is a tile of 64 output channels by one input word, and zero groups inside a
//! live tile are masked. Random group sparsity at `G = 16` leaves almost every tile live,
//! and the vector kernel still runs such a layer 30x faster than the list
//! (`cargo bench -p sbdnet-kernels --bench binary -- pointwise`).

use super::pointwise::{PackedPointwise, PwImpl};
use super::{words, SignThreshold, WORD_BITS};

/// One surviving input word of one output channel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Entry {
    word: u32,
    mask: u64,
    w: u64,
}

/// A sparse binary pointwise layer, planned.
#[derive(Clone, Debug, PartialEq)]
pub struct SparsePointwise {
    cin: usize,
    cout: usize,
    /// `entries[starts[co]..starts[co + 1]]` are the kept words of `co`.
    starts: Vec<usize>,
    entries: Vec<Entry>,
    kept: Vec<i32>,
    thr: Vec<SignThreshold>,
    /// The same layer as a masked word-major kernel, run where [`PwImpl::current`] is AVX-512.
    vector: Option<PackedPointwise>,
}

impl SparsePointwise {
    /// From packed weights `[cout][words(cin)]` and a group mask `[cout][ceil(cin / g)]`
    /// (`1` kept, `0` pruned).
    pub fn new(cin: usize, cout: usize, w: &[u64], mask: &[u8], g: usize) -> Self {
        let wd = words(cin);
        let per = cin.div_ceil(g);
        assert!(g > 0 && w.len() >= cout * wd && mask.len() >= cout * per);
        let mut starts = vec![0];
        let mut entries = Vec::new();
        let mut kept = Vec::with_capacity(cout);
        let mut masks = vec![0u64; cout * wd];
        for co in 0..cout {
            let mut n = 0;
            for j in 0..wd {
                let mut m = 0u64;
                for b in 0..WORD_BITS.min(cin - j * WORD_BITS) {
                    let ci = j * WORD_BITS + b;
                    if mask[co * per + ci / g] == 1 {
                        m |= 1 << b;
                    }
                }
                masks[co * wd + j] = m;
                if m != 0 {
                    n += m.count_ones() as i32;
                    entries.push(Entry { word: j as u32, mask: m, w: w[co * wd + j] });
                }
            }
            kept.push(n);
            starts.push(entries.len());
        }
        let vector = (PwImpl::current() == PwImpl::Avx512).then(|| PackedPointwise::new_masked(cin, cout, w, &masks));
        SparsePointwise { cin, cout, starts, entries, kept, thr: Vec::new(), vector }
    }

    /// Attach output thresholds for [`Self::forward_packed`].
    pub fn with_thresholds(mut self, thr: &[SignThreshold]) -> Self {
        assert_eq!(thr.len(), self.cout);
        self.thr = thr.to_vec();
        self.vector = self.vector.map(|v| v.with_thresholds(thr));
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

    /// Surviving weights (input channels kept, summed over output channels): the binary
    /// multiply-accumulates per pixel.
    pub fn kept_weights(&self) -> usize {
        self.kept.iter().map(|&k| k as usize).sum()
    }

    /// Surviving input words stored over all output channels (the work per pixel).
    pub fn kept_words(&self) -> usize {
        self.entries.len()
    }

    #[inline(always)]
    fn dot(&self, xr: &[u64], co: usize) -> i32 {
        let mut a = 0u32;
        for e in &self.entries[self.starts[co]..self.starts[co + 1]] {
            a += ((xr[e.word as usize] ^ e.w) & e.mask).count_ones();
        }
        self.kept[co] - 2 * a as i32
    }

    /// Whether [`Self::forward_affine_gap`] runs here (the AVX-512 masked kernel).
    pub fn has_affine_gap(&self) -> bool {
        self.vector.as_ref().is_some_and(|v| v.has_affine_gap())
    }

    /// The layer, an affine with activation and global average pooling, fused: see
    /// [`PackedPointwise::forward_affine_gap`]. Requires [`Self::has_affine_gap`].
    pub fn forward_affine_gap(&self, x: &[u64], rows: usize, scale: &[f32], bias: &[f32], act: u8, out: &mut [f32]) {
        let v = self.vector.as_ref().expect("forward_affine_gap needs the AVX-512 kernel");
        v.forward_affine_gap(x, rows, scale, bias, act, out)
    }

    /// Integer dot products of `rows` packed pixels; `out`: `rows * cout`.
    pub fn forward(&self, x: &[u64], rows: usize, out: &mut [i32]) {
        let wd = words(self.cin);
        assert!(x.len() >= rows * wd && out.len() >= rows * self.cout);
        if let Some(v) = &self.vector {
            return v.forward(x, rows, out);
        }
        run(|| {
            for r in 0..rows {
                let xr = &x[r * wd..][..wd];
                for (co, o) in out[r * self.cout..][..self.cout].iter_mut().enumerate() {
                    *o = self.dot(xr, co);
                }
            }
        })
    }

    /// Packed sign bits through the thresholds; `out`: `rows * words(cout)` words.
    pub fn forward_packed(&self, x: &[u64], rows: usize, out: &mut [u64]) {
        let (wd, od) = (words(self.cin), words(self.cout));
        assert!(self.thr.len() == self.cout, "forward_packed needs with_thresholds");
        assert!(x.len() >= rows * wd && out.len() >= rows * od);
        if let Some(v) = &self.vector {
            return v.forward_packed(x, rows, out, &mut []);
        }
        run(|| {
            for r in 0..rows {
                let xr = &x[r * wd..][..wd];
                let o = &mut out[r * od..][..od];
                o.fill(0);
                for co in 0..self.cout {
                    o[co / WORD_BITS] |= u64::from(self.thr[co].bit(self.dot(xr, co))) << (co % WORD_BITS);
                }
            }
        })
    }
}

/// Run `f` compiled with `POPCNT` where the process uses it.
#[inline(always)]
fn run(f: impl FnOnce()) {
    #[cfg(target_arch = "x86_64")]
    {
        if matches!(
            super::BinaryImpl::current(),
            super::BinaryImpl::Popcnt | super::BinaryImpl::Avx2Shuffle | super::BinaryImpl::Avx512
        ) {
            #[target_feature(enable = "popcnt")]
            unsafe fn popcnt(f: impl FnOnce()) {
                f()
            }
            // SAFETY: those implementations are only current when the CPU has popcnt.
            return unsafe { popcnt(f) };
        }
    }
    f()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::binary::pack_signs;
    use crate::rng::Rng;

    #[test]
    fn sparse_pointwise_matches_plain_sums() {
        let mut rng = Rng::new(11);
        for &(rows, cin, cout, g) in &[
            (3usize, 16usize, 8usize, 8usize),
            (4, 100, 70, 16),
            (2, 130, 9, 64),
            (5, 64, 64, 32),
            (2, 7, 3, 4usize),
            (3, 192, 70, 64),
            (4, 20, 40, 4),
        ] {
            let per = cin.div_ceil(g);
            // (3, 192, 70, 64): input word 1 pruned for every output channel, so whole tiles
            // of the vector kernel are skipped.
            let dead = |gi: usize| cin == 192 && gi == 1;
            let xf: Vec<f32> = (0..rows * cin).map(|_| rng.normal()).collect();
            let wf: Vec<f32> = (0..cout * cin).map(|_| rng.normal()).collect();
            let mask: Vec<u8> = (0..cout * per).map(|i| u8::from(rng.uniform() < 0.4 && !dead(i % per))).collect();
            let (mut x, mut w) = (vec![0u64; rows * words(cin)], vec![0u64; cout * words(cin)]);
            pack_signs(&xf, cin, &mut x);
            pack_signs(&wf, cin, &mut w);
            let thr: Vec<SignThreshold> =
                (0..cout).map(|c| SignThreshold { thr: (c as i32 % 5) - 2, negative: c % 2 == 0 }).collect();
            let p = SparsePointwise::new(cin, cout, &w, &mask, g).with_thresholds(&thr);
            let mut got = vec![0i32; rows * cout];
            p.forward(&x, rows, &mut got);
            let mut bits = vec![0u64; rows * words(cout)];
            p.forward_packed(&x, rows, &mut bits);
            for r in 0..rows {
                for co in 0..cout {
                    let mut s = 0i32;
                    for ci in 0..cin {
                        if mask[co * per + ci / g] == 1 {
                            let a = if xf[r * cin + ci] < 0.0 { -1 } else { 1 };
                            let b = if wf[co * cin + ci] < 0.0 { -1 } else { 1 };
                            s += a * b;
                        }
                    }
                    assert_eq!(got[r * cout + co], s, "{rows}x{cin}->{cout} g{g} at {r},{co}");
                    let bit = (bits[r * words(cout) + co / 64] >> (co % 64)) & 1 == 1;
                    assert_eq!(bit, thr[co].bit(s));
                }
            }
        }
    }
}

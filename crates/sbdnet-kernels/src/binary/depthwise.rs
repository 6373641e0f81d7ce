//! Bitwise depthwise 3x3: 64 channels at once with bit-sliced counting.
//!
//! For one output pixel and one word of 64 channels, tap `t` gives the 64-lane vector
//! `agree_t = !(x_t XOR w_t)` (lane set where activation and weight are equal, i.e. their
//! product is `+1`), forced to `0` for a padded tap. A carry-save adder tree adds the nine
//! vectors into a 4-bit counter per lane held in four bit planes `a0..a3` (`a <= 9 < 16`).
//! With `v` valid taps the sum is `s = agree - (v - agree) = 2 * agree - v`.
//!
//! Packed output compares `agree` with a per-lane bound `K` bit-sliced (the borrow of
//! `agree - K`), see [`super::DwThresholds`].

use super::conv::valid_taps;
use super::{word_mask, words, BinaryImpl, DwThresholds, WORD_BITS};
use crate::conv::ConvGeom;
use rayon::prelude::*;

/// A vector of 64-lane bit vectors: one word, or the same word of 4 adjacent pixels (which
/// the compiler keeps in one 256-bit register on the AVX2 build).
trait Lanes: Copy {
    fn xor(self, o: Self) -> Self;
    fn and(self, o: Self) -> Self;
    fn or(self, o: Self) -> Self;
    fn not(self) -> Self;
    fn zero() -> Self;
}

impl Lanes for u64 {
    #[inline(always)]
    fn xor(self, o: Self) -> Self {
        self ^ o
    }
    #[inline(always)]
    fn and(self, o: Self) -> Self {
        self & o
    }
    #[inline(always)]
    fn or(self, o: Self) -> Self {
        self | o
    }
    #[inline(always)]
    fn not(self) -> Self {
        !self
    }
    #[inline(always)]
    fn zero() -> Self {
        0
    }
}

/// Four pixels' words.
#[derive(Clone, Copy)]
struct L4([u64; 4]);

impl Lanes for L4 {
    #[inline(always)]
    fn xor(self, o: Self) -> Self {
        L4(std::array::from_fn(|i| self.0[i] ^ o.0[i]))
    }
    #[inline(always)]
    fn and(self, o: Self) -> Self {
        L4(std::array::from_fn(|i| self.0[i] & o.0[i]))
    }
    #[inline(always)]
    fn or(self, o: Self) -> Self {
        L4(std::array::from_fn(|i| self.0[i] | o.0[i]))
    }
    #[inline(always)]
    fn not(self) -> Self {
        L4(std::array::from_fn(|i| !self.0[i]))
    }
    #[inline(always)]
    fn zero() -> Self {
        L4([0; 4])
    }
}

/// Full adder on 64 lanes: `(sum, carry)` of `a + b + c`.
#[inline(always)]
fn csa<T: Lanes>(a: T, b: T, c: T) -> (T, T) {
    let u = a.xor(b);
    (u.xor(c), a.and(b).or(u.and(c)))
}

/// Lane-wise count of the set bits of nine vectors, as bit planes `[1, 2, 4, 8]`.
///
/// `f0+f1+f2 = s1 + 2 c1` (and likewise `s2, c2`, `s3, c3`); `s1+s2+s3 = ones + 2 c4`;
/// `c1+c2+c3 = t + 2 c5`; `t + c4 = twos + 2 c6`; `c5 + c6 = fours + 2 eights`. So the total
/// is `ones + 2 twos + 4 fours + 8 eights`, in 29 bit operations instead of 9 ripple adds.
#[inline(always)]
fn count9<T: Lanes>(f: &[T; 9]) -> [T; 4] {
    let (s1, c1) = csa(f[0], f[1], f[2]);
    let (s2, c2) = csa(f[3], f[4], f[5]);
    let (s3, c3) = csa(f[6], f[7], f[8]);
    let (ones, c4) = csa(s1, s2, s3);
    let (t, c5) = csa(c1, c2, c3);
    let (twos, c6) = (t.xor(c4), t.and(c4));
    let (fours, eights) = (c5.xor(c6), c5.and(c6));
    [ones, twos, fours, eights]
}

/// Lanes where the 4-bit number `a` is `>= k` (no borrow out of `a - k`).
#[inline(always)]
fn ge<T: Lanes>(a: &[T; 4], k: &[T; 4]) -> T {
    let mut borrow = T::zero();
    for p in 0..4 {
        borrow = a[p].not().and(k[p]).or(a[p].xor(k[p]).not().and(borrow));
    }
    borrow.not()
}

/// `SPREAD[b]` has bit `j` of `b` moved to bit `8 j` (one byte per bit).
const SPREAD: [u64; 256] = {
    let mut t = [0u64; 256];
    let mut b = 0;
    while b < 256 {
        let mut j = 0;
        while j < 8 {
            t[b] |= (((b >> j) & 1) as u64) << (8 * j);
            j += 1;
        }
        b += 1;
    }
    t
};

/// Write `2 * agree - v` for the lanes of `o` (at most 64) from the agree bit planes: eight
/// lanes at a time, each plane's byte spread into one byte per lane by [`SPREAD`].
#[inline(always)]
fn write_sums(a: &[u64; 4], v: i32, o: &mut [i32]) {
    for (byte, o8) in o.chunks_mut(8).enumerate() {
        let sh = 8 * byte;
        let sp = |p: usize| SPREAD[((a[p] >> sh) & 0xff) as usize];
        let n = (sp(0) | sp(1) << 1 | sp(2) << 2 | sp(3) << 3).to_le_bytes();
        for (o, &n) in o8.iter_mut().zip(&n) {
            *o = 2 * n as i32 - v;
        }
    }
}

/// Tap offsets (input pixel index, relative to the image) and validity masks of output
/// pixel `(oy, ox)`; returns the count of valid taps.
#[inline(always)]
fn taps(g: &ConvGeom, oy: usize, ox: usize, off: &mut [usize; 9], mask: &mut [u64; 9]) -> usize {
    let (ky0, ky1) = valid_taps(oy, g.stride, g.pad, 3, g.h);
    let (kx0, kx1) = valid_taps(ox, g.stride, g.pad, 3, g.w);
    for ky in 0..3 {
        for kx in 0..3 {
            let t = ky * 3 + kx;
            if (ky0..ky1).contains(&ky) && (kx0..kx1).contains(&kx) {
                off[t] = (oy * g.stride + ky - g.pad) * g.w + ox * g.stride + kx - g.pad;
                mask[t] = u64::MAX;
            } else {
                off[t] = 0;
                mask[t] = 0;
            }
        }
    }
    (ky1 - ky0) * (kx1 - kx0)
}

/// Bit planes of the agree counts of word `wi` (`xi`: one image, packed).
#[inline(always)]
fn agree(xi: &[u64], w: &[u64], wd: usize, wi: usize, off: &[usize; 9], mask: &[u64; 9]) -> [u64; 4] {
    let mut f = [0u64; 9];
    for t in 0..9 {
        f[t] = !(xi[off[t] * wd + wi] ^ w[t * wd + wi]) & mask[t];
    }
    count9(&f)
}

/// Whether output pixel `ox` (and row `oy`, via `ky`) sees all three taps of an axis.
#[inline(always)]
fn full(o: usize, stride: usize, pad: usize, size: usize) -> bool {
    let start = o * stride;
    start >= pad && start + 3 <= size + pad
}

/// Agree planes of word `wi` for the four interior pixels `ox..ox + 4` of row `oy` (all
/// nine taps valid for each).
#[inline(always)]
fn agree4(g: &ConvGeom, xi: &[u64], w: &[u64], wd: usize, wi: usize, oy: usize, ox: usize) -> [L4; 4] {
    let (s, row) = (g.stride, g.w);
    let base = (oy * s - g.pad) * row + ox * s - g.pad;
    let mut f = [L4::zero(); 9];
    for ky in 0..3 {
        for kx in 0..3 {
            let t = ky * 3 + kx;
            let (i, wt) = (base + ky * row + kx, w[t * wd + wi]);
            f[t] = L4(std::array::from_fn(|p| !(xi[(i + p * s) * wd + wi] ^ wt)));
        }
    }
    count9(&f)
}

/// Calls `one(out, ox)` for single pixels and `four(out, ox)` for runs of four interior pixels.
#[inline(always)]
fn walk_row<O: ?Sized>(
    g: &ConvGeom,
    oy: usize,
    out: &mut O,
    mut one: impl FnMut(&mut O, usize),
    mut four: impl FnMut(&mut O, usize),
) {
    let row_full = full(oy, g.stride, g.pad, g.h);
    let mut ox = 0;
    while ox < g.ow {
        if row_full && ox + 4 <= g.ow && full(ox, g.stride, g.pad, g.w) && full(ox + 3, g.stride, g.pad, g.w) {
            four(out, ox);
            ox += 4;
        } else {
            one(out, ox);
            ox += 1;
        }
    }
}

#[inline(always)]
fn row_i32(g: &ConvGeom, x: &[u64], w: &[u64], out: &mut [i32], row: usize) {
    let (c, wd) = (g.cin, words(g.cin));
    let (b, oy) = (row / g.oh, row % g.oh);
    let xi = &x[b * g.h * g.w * wd..][..g.h * g.w * wd];
    let (mut off, mut mask) = ([0usize; 9], [0u64; 9]);
    walk_row(
        g,
        oy,
        out,
        |out, ox| {
            let v = taps(g, oy, ox, &mut off, &mut mask) as i32;
            for (wi, ow) in out[ox * c..][..c].chunks_mut(WORD_BITS).enumerate() {
                write_sums(&agree(xi, w, wd, wi, &off, &mask), v, ow);
            }
        },
        |out, ox| {
            for wi in 0..wd {
                let a = agree4(g, xi, w, wd, wi, oy, ox);
                for p in 0..4 {
                    let lanes = &mut out[(ox + p) * c + wi * WORD_BITS..][..(c - wi * WORD_BITS).min(WORD_BITS)];
                    write_sums(&[a[0].0[p], a[1].0[p], a[2].0[p], a[3].0[p]], 9, lanes);
                }
            }
        },
    );
}

#[inline(always)]
fn row_packed(g: &ConvGeom, x: &[u64], w: &[u64], thr: &DwThresholds, out: &mut [u64], row: usize) {
    let (c, wd) = (g.cin, words(g.cin));
    let (b, oy) = (row / g.oh, row % g.oh);
    let xi = &x[b * g.h * g.w * wd..][..g.h * g.w * wd];
    let (mut off, mut mask) = ([0usize; 9], [0u64; 9]);
    walk_row(
        g,
        oy,
        out,
        |out, ox| {
            let v = taps(g, oy, ox, &mut off, &mut mask);
            let bounds = &thr.planes[v * wd..][..wd];
            for (wi, o) in out[ox * wd..][..wd].iter_mut().enumerate() {
                let a = agree(xi, w, wd, wi, &off, &mask);
                *o = (ge(&a, &bounds[wi]) ^ thr.not_negative[wi]) & word_mask(c, wi);
            }
        },
        |out, ox| {
            let bounds = &thr.planes[9 * wd..][..wd];
            for wi in 0..wd {
                let a = agree4(g, xi, w, wd, wi, oy, ox);
                let k = bounds[wi].map(|p| L4([p; 4]));
                let m = L4([thr.not_negative[wi]; 4]);
                let bits = ge(&a, &k).xor(m).and(L4([word_mask(c, wi); 4]));
                for p in 0..4 {
                    out[(ox + p) * wd + wi] = bits.0[p];
                }
            }
        },
    );
}

macro_rules! dispatch_row {
    ($imp:expr, $f:ident, $out:ty, ($($a:ident : $t:ty),*)) => {{
        match $imp {
            #[cfg(target_arch = "x86_64")]
            BinaryImpl::Popcnt => {
                #[target_feature(enable = "popcnt")]
                unsafe fn k($($a: $t),*, out: $out, row: usize) {
                    $f($($a),*, out, row)
                }
                // SAFETY: only run when the CPU reports popcnt (`BinaryImpl::available`).
                |$($a: $t),*, out: $out, row: usize| unsafe { k($($a),*, out, row) }
            }
            #[cfg(target_arch = "x86_64")]
            BinaryImpl::Avx2Shuffle => {
                #[target_feature(enable = "avx2,popcnt")]
                unsafe fn k($($a: $t),*, out: $out, row: usize) {
                    $f($($a),*, out, row)
                }
                // SAFETY: only run when the CPU reports avx2 and popcnt.
                |$($a: $t),*, out: $out, row: usize| unsafe { k($($a),*, out, row) }
            }
            _ => {
                fn k($($a: $t),*, out: $out, row: usize) {
                    $f($($a),*, out, row)
                }
                k
            }
        }
    }};
}

/// Integer output, threaded over output rows; `imp` is not `Reference`.
pub(super) fn bdw_forward(imp: BinaryImpl, g: &ConvGeom, x: &[u64], w: &[u64], out: &mut [i32]) {
    let f: fn(&ConvGeom, &[u64], &[u64], &mut [i32], usize) =
        dispatch_row!(imp, row_i32, &mut [i32], (g: &ConvGeom, x: &[u64], w: &[u64]));
    let row_len = g.ow * g.cin;
    out[..g.out_len()].par_chunks_mut(row_len).enumerate().for_each(|(row, o)| f(g, x, w, o, row));
}

/// Packed output through thresholds, threaded over output rows; `imp` is not `Reference`.
pub(super) fn bdw_forward_packed(
    imp: BinaryImpl,
    g: &ConvGeom,
    x: &[u64],
    w: &[u64],
    thr: &DwThresholds,
    out: &mut [u64],
) {
    type Row = fn(&ConvGeom, &[u64], &[u64], &DwThresholds, &mut [u64], usize);
    let f: Row = dispatch_row!(imp, row_packed, &mut [u64], (g: &ConvGeom, x: &[u64], w: &[u64], thr: &DwThresholds));
    let row_len = g.ow * words(g.cin);
    out[..g.batch * g.oh * row_len].par_chunks_mut(row_len).enumerate().for_each(|(row, o)| f(g, x, w, thr, o, row));
}

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
use super::{word_mask, words, BinaryImpl, DwThresholds, SumAffine, WORD_BITS};
use crate::conv::ConvGeom;
#[cfg(target_arch = "x86_64")]
use crate::lanes16;
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

/// How the integer kernel writes `2 * agree - v` from the agree planes, into the lanes `o`
/// of channels `ch0..`.
trait SumWriter<T> {
    /// # Safety
    /// The writer's instructions must be enabled where it is inlined: none for [`Spread`],
    /// AVX-512 F for [`Masks512`] and [`SumAffine`] (only `row_*_avx512` use them).
    unsafe fn write(&self, a: &[u64; 4], v: i32, ch0: usize, o: &mut [T]);
}

/// [`write_sums`]: byte spreading by table, 8 lanes at a time (any CPU).
struct Spread;

impl SumWriter<i32> for Spread {
    #[inline(always)]
    unsafe fn write(&self, a: &[u64; 4], v: i32, _: usize, o: &mut [i32]) {
        write_sums(a, v, o)
    }
}

/// 16 lanes per 512-bit register: each plane's 16 bits select the lanes that get `2^plane`
/// (four masked adds), then `2 * count - v` and a masked store. Only instantiated by the
/// AVX-512 arm of [`bdw_forward`], whose function enables AVX-512 F.
#[cfg(target_arch = "x86_64")]
struct Masks512;

/// The sums `2 * agree - v` of lanes `16 q..` (mask `m` of the lanes present) in one register.
///
/// # Safety
/// AVX-512 F: inlined only into functions that enable it.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn sums16(a: &[u64; 4], v: i32, q: usize) -> std::arch::x86_64::__m512i {
    use std::arch::x86_64::*;
    let mut cnt = _mm512_setzero_si512();
    for (p, &plane) in a.iter().enumerate() {
        cnt = _mm512_mask_add_epi32(cnt, (plane >> (16 * q)) as __mmask16, cnt, _mm512_set1_epi32(1 << p));
    }
    _mm512_sub_epi32(_mm512_slli_epi32::<1>(cnt), _mm512_set1_epi32(v))
}

#[cfg(target_arch = "x86_64")]
impl SumWriter<i32> for Masks512 {
    #[inline(always)]
    unsafe fn write(&self, a: &[u64; 4], v: i32, _: usize, o: &mut [i32]) {
        use std::arch::x86_64::*;
        // SAFETY: AVX-512 F is enabled where this is inlined (the trait's contract); stores
        // are masked to `o`'s length.
        unsafe {
            let n = o.len().min(WORD_BITS);
            for q in 0..n.div_ceil(16) {
                let s = sums16(a, v, q);
                _mm512_mask_storeu_epi32(o.as_mut_ptr().add(16 * q).cast(), lanes16(n - 16 * q), s);
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
impl SumWriter<f32> for SumAffine<'_> {
    #[inline(always)]
    unsafe fn write(&self, a: &[u64; 4], v: i32, ch0: usize, o: &mut [f32]) {
        use std::arch::x86_64::*;
        // SAFETY: AVX-512 F is enabled where this is inlined (the trait's contract); loads
        // and stores are masked to the channels present (`o`'s length; `scale` and `bias`
        // checked to cover every channel by `bdw_forward_affine`).
        unsafe {
            let n = o.len().min(WORD_BITS);
            for q in 0..n.div_ceil(16) {
                let m = lanes16(n - 16 * q);
                let y = self.apply16(ch0 + 16 * q, m, _mm512_cvtepi32_ps(sums16(a, v, q)));
                _mm512_mask_storeu_ps(o.as_mut_ptr().add(16 * q), m, y);
            }
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
    row_sums(g, x, w, out, row, &Spread)
}

/// [`row_i32`] writing the sums with AVX-512 masks.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,popcnt")]
unsafe fn row_i32_avx512(g: &ConvGeom, x: &[u64], w: &[u64], out: &mut [i32], row: usize) {
    row_sums(g, x, w, out, row, &Masks512)
}

/// [`row_i32`] through a per-channel affine into `f32`, on AVX-512.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,popcnt")]
unsafe fn row_affine_avx512(g: &ConvGeom, x: &[u64], w: &[u64], aff: &SumAffine, out: &mut [f32], row: usize) {
    row_sums(g, x, w, out, row, aff)
}

#[inline(always)]
fn row_sums<T, W: SumWriter<T>>(g: &ConvGeom, x: &[u64], w: &[u64], out: &mut [T], row: usize, wr: &W) {
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
                // SAFETY: `row_sums` is instantiated with each writer only inside a function
                // enabling its instructions (`row_i32`, `row_*_avx512`).
                unsafe { wr.write(&agree(xi, w, wd, wi, &off, &mask), v, wi * WORD_BITS, ow) };
            }
        },
        |out, ox| {
            for wi in 0..wd {
                let a = agree4(g, xi, w, wd, wi, oy, ox);
                for p in 0..4 {
                    let lanes = &mut out[(ox + p) * c + wi * WORD_BITS..][..(c - wi * WORD_BITS).min(WORD_BITS)];
                    let planes = [a[0].0[p], a[1].0[p], a[2].0[p], a[3].0[p]];
                    // SAFETY: as above.
                    unsafe { wr.write(&planes, 9, wi * WORD_BITS, lanes) };
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
            BinaryImpl::Popcnt | BinaryImpl::Avx512 => {
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

/// Run `f(row, out_row)` over the rows of `out` (`row_len` values each): threaded with rayon
/// when the pool has more than one thread and the layer is large, a plain loop otherwise
/// (task splitting and waking a worker cost microseconds on small layers).
fn for_rows<T: Send>(out: &mut [T], row_len: usize, f: impl Fn(usize, &mut [T]) + Sync) {
    if row_len == 0 {
        return;
    }
    // Below about 2^16 outputs (tens of microseconds) waking another thread costs more than
    // it saves (dscnn's layers at batch 1 ran slower on 2 threads than on 1).
    if crate::threads() <= 1 || out.len() < 1 << 16 {
        out.chunks_mut(row_len).enumerate().for_each(|(row, o)| f(row, o));
    } else {
        out.par_chunks_mut(row_len).enumerate().for_each(|(row, o)| f(row, o));
    }
}

/// Integer output, threaded over output rows; `imp` is not `Reference`.
pub(super) fn bdw_forward(imp: BinaryImpl, g: &ConvGeom, x: &[u64], w: &[u64], out: &mut [i32]) {
    let f: fn(&ConvGeom, &[u64], &[u64], &mut [i32], usize) = match imp {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `Avx512` is only run when the CPU reports avx512f and popcnt
        // (`BinaryImpl::available`).
        BinaryImpl::Avx512 => |g, x, w, out, row| unsafe { row_i32_avx512(g, x, w, out, row) },
        _ => dispatch_row!(imp, row_i32, &mut [i32], (g: &ConvGeom, x: &[u64], w: &[u64])),
    };
    for_rows(&mut out[..g.out_len()], g.ow * g.cin, |row, o| f(g, x, w, o, row));
}

/// Integer sums through a per-channel affine into `f32`, threaded over output rows (AVX-512
/// only: the caller checks [`BinaryImpl::Avx512`]).
#[cfg(target_arch = "x86_64")]
pub(super) fn bdw_forward_affine(g: &ConvGeom, x: &[u64], w: &[u64], aff: &SumAffine, out: &mut [f32]) {
    for_rows(&mut out[..g.out_len()], g.ow * g.cin, |row, o| {
        // SAFETY: the caller runs this only where `BinaryImpl::Avx512` is available.
        unsafe { row_affine_avx512(g, x, w, aff, o, row) }
    });
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
    let f: Row = match imp {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `Avx512` is only run when the CPU reports avx512f (`BinaryImpl::available`).
        BinaryImpl::Avx512 if g.cin <= 32 => {
            |g, x, w, thr, out, row| unsafe { avx512::row_packed32(g, x, w, thr, out, row) }
        }
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above.
        BinaryImpl::Avx512 => |g, x, w, thr, out, row| unsafe { avx512::row_packed(g, x, w, thr, out, row) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `avx2::usable` checked that the CPU has AVX2 and POPCNT.
        BinaryImpl::Popcnt | BinaryImpl::Avx2Shuffle if avx2::usable() => {
            |g, x, w, thr, out, row| unsafe { avx2::row_packed(g, x, w, thr, out, row) }
        }
        _ => dispatch_row!(imp, row_packed, &mut [u64], (g: &ConvGeom, x: &[u64], w: &[u64], thr: &DwThresholds)),
    };
    let row_len = g.ow * words(g.cin);
    for_rows(&mut out[..g.batch * g.oh * row_len], row_len, |row, o| f(g, x, w, thr, o, row));
}

/// The packed kernel with four output pixels per 256-bit register for the interior runs
/// (the same carry-save adders and bit-sliced comparison as [`row_packed`], lane for lane),
/// written without closures so every step is compiled for AVX2.
#[cfg(target_arch = "x86_64")]
mod avx2 {
    #![allow(unsafe_op_in_unsafe_fn)]
    use super::super::conv::valid_taps;
    use super::super::{word_mask, words, DwThresholds};
    use super::{count9, full, ge, Lanes};
    use crate::conv::ConvGeom;
    use std::arch::x86_64::*;

    /// Four pixels' words in one register.
    #[derive(Clone, Copy)]
    struct Y(__m256i);

    impl Lanes for Y {
        #[inline(always)]
        fn xor(self, o: Self) -> Self {
            // SAFETY: inlined only into `row_packed`, which enables AVX2.
            Y(unsafe { _mm256_xor_si256(self.0, o.0) })
        }
        #[inline(always)]
        fn and(self, o: Self) -> Self {
            // SAFETY: as above.
            Y(unsafe { _mm256_and_si256(self.0, o.0) })
        }
        #[inline(always)]
        fn or(self, o: Self) -> Self {
            // SAFETY: as above.
            Y(unsafe { _mm256_or_si256(self.0, o.0) })
        }
        #[inline(always)]
        fn not(self) -> Self {
            // SAFETY: as above.
            Y(unsafe { _mm256_xor_si256(self.0, _mm256_set1_epi64x(-1)) })
        }
        #[inline(always)]
        fn zero() -> Self {
            // SAFETY: as above.
            Y(unsafe { _mm256_setzero_si256() })
        }
    }

    /// Whether the CPU runs this kernel (AVX2 and POPCNT).
    pub(super) fn usable() -> bool {
        is_x86_feature_detected!("avx2") && is_x86_feature_detected!("popcnt")
    }

    /// [`super::row_packed`] with four pixels in AVX2 registers: interior runs read each
    /// tap's four words with one load (stride 1, one word per pixel) or four, border runs
    /// zero the taps that fall in the padding lane by lane and compare each lane with the
    /// bound of its own tap count (the scalar kernel's arithmetic, lane for lane).
    #[target_feature(enable = "avx2,popcnt")]
    pub(super) unsafe fn row_packed(
        g: &ConvGeom,
        x: &[u64],
        w: &[u64],
        thr: &DwThresholds,
        out: &mut [u64],
        row: usize,
    ) {
        let (c, wd) = (g.cin, words(g.cin));
        let (b, oy) = (row / g.oh, row % g.oh);
        let xi = &x[b * g.h * g.w * wd..][..g.h * g.w * wd];
        let row_full = full(oy, g.stride, g.pad, g.h);
        let (ky0, ky1) = valid_taps(oy, g.stride, g.pad, 3, g.h);
        let (s, rw) = (g.stride, g.w);
        let mut ox = 0;
        while ox < g.ow {
            let np = (g.ow - ox).min(4);
            if row_full && np == 4 && full(ox, s, g.pad, g.w) && full(ox + 3, s, g.pad, g.w) {
                let base = (oy * s - g.pad) * rw + ox * s - g.pad;
                let bounds = &thr.planes[9 * wd..][..wd];
                for wi in 0..wd {
                    let mut f = [Y::zero(); 9];
                    for ky in 0..3 {
                        for kx in 0..3 {
                            let t = ky * 3 + kx;
                            let i = base + ky * rw + kx;
                            let xv = if s == 1 && wd == 1 {
                                let v = &xi[i..i + 4];
                                _mm256_loadu_si256(v.as_ptr().cast())
                            } else {
                                _mm256_setr_epi64x(
                                    xi[i * wd + wi] as i64,
                                    xi[(i + s) * wd + wi] as i64,
                                    xi[(i + 2 * s) * wd + wi] as i64,
                                    xi[(i + 3 * s) * wd + wi] as i64,
                                )
                            };
                            // !(x ^ w) = x ^ !w.
                            f[t] = Y(_mm256_xor_si256(xv, _mm256_set1_epi64x(!w[t * wd + wi] as i64)));
                        }
                    }
                    let a = count9(&f);
                    let k = bounds[wi].map(|p| Y(_mm256_set1_epi64x(p as i64)));
                    store(out, ox, 4, wd, wi, thr, c, &a, k);
                }
            } else {
                // Lanes past the row's end repeat the last pixel (computed, not stored).
                let oxs: [usize; 4] = std::array::from_fn(|p| ox + p.min(np - 1));
                let kxs: [(usize, usize); 4] = std::array::from_fn(|p| valid_taps(oxs[p], s, g.pad, 3, g.w));
                let v: [usize; 4] = std::array::from_fn(|p| (ky1 - ky0) * (kxs[p].1 - kxs[p].0));
                for wi in 0..wd {
                    let mut f = [Y::zero(); 9];
                    for ky in ky0..ky1 {
                        let iy = oy * s + ky - g.pad;
                        for kx in 0..3 {
                            let t = ky * 3 + kx;
                            // A padded tap gives 0 (no agreement), as the scalar kernel's mask.
                            let lane = |p: usize| -> i64 {
                                let (k0, k1) = kxs[p];
                                if (k0..k1).contains(&kx) {
                                    let ix = oxs[p] * s + kx - g.pad;
                                    !(xi[(iy * rw + ix) * wd + wi] ^ w[t * wd + wi]) as i64
                                } else {
                                    0
                                }
                            };
                            f[t] = Y(_mm256_setr_epi64x(lane(0), lane(1), lane(2), lane(3)));
                        }
                    }
                    let a = count9(&f);
                    let k: [Y; 4] = std::array::from_fn(|q| {
                        let pl = |p: usize| thr.planes[v[p] * wd + wi][q] as i64;
                        Y(_mm256_setr_epi64x(pl(0), pl(1), pl(2), pl(3)))
                    });
                    store(out, ox, np, wd, wi, thr, c, &a, k);
                }
            }
            ox += np;
        }
    }

    /// Output word `wi` of pixels `ox..ox + np` from the agree planes `a` and the bounds `k`.
    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    unsafe fn store(
        out: &mut [u64],
        ox: usize,
        np: usize,
        wd: usize,
        wi: usize,
        thr: &DwThresholds,
        c: usize,
        a: &[Y; 4],
        k: [Y; 4],
    ) {
        let m = Y(_mm256_set1_epi64x(thr.not_negative[wi] as i64));
        let bits = ge(a, &k).xor(m).and(Y(_mm256_set1_epi64x(word_mask(c, wi) as i64)));
        let mut l = [0u64; 4];
        _mm256_storeu_si256(l.as_mut_ptr().cast(), bits.0);
        for (p, &v) in l.iter().enumerate().take(np) {
            out[(ox + p) * wd + wi] = v;
        }
    }
}

/// The packed kernel on 8 output pixels per 512-bit register.
///
/// Lane `p` of a register holds word `wi` of output pixel `ox0 + p`. A tap's input words
/// come from one masked load (one word per pixel, stride 1) or a masked gather (otherwise);
/// lanes whose tap falls in the padding, or past the row's end, are masked off and their
/// agree vector forced to zero by a zero-masked ternary-logic XNOR. The carry-save adders and
/// the bit-sliced comparison are one `vpternlogq` per full adder output, borrow step and
/// output bit. Border pixels see fewer valid taps, so their lanes take the bound of their own
/// tap count; the rest is the scalar kernel's arithmetic, lane for lane.
#[cfg(target_arch = "x86_64")]
mod avx512 {
    use super::super::conv::valid_taps;
    use super::super::{word_mask, words, DwThresholds};
    use crate::conv::ConvGeom;
    use std::arch::x86_64::*;

    /// `vpternlogq` truth tables (operands `a`, `b`, `c` = 0xF0, 0xCC, 0xAA).
    const XNOR_AB: i32 = 0xC3;
    const XOR3: i32 = 0x96;
    const MAJ3: i32 = 0xE8;
    /// Borrow of `a - k` after this plane: `(!a & k) | (!(a ^ k) & borrow)`.
    const BORROW: i32 = 0x8E;
    /// Output bit: `!(borrow ^ not_negative) & word_mask` (`ge = !borrow`).
    const OUT: i32 = 0x82;

    /// Output columns whose tap column `kx` lies inside the image: `lo[kx] <= ox < hi[kx]`.
    fn tap_columns(g: &ConvGeom) -> ([isize; 3], [isize; 3]) {
        let (s, pad) = (g.stride as isize, g.pad as isize);
        let lo = std::array::from_fn(|kx| ((pad - kx as isize).max(0) as usize).div_ceil(s as usize) as isize);
        let hi = std::array::from_fn(|kx| {
            let last = g.w as isize - 1 + pad - kx as isize;
            if last < 0 {
                0
            } else {
                last / s + 1
            }
        });
        (lo, hi)
    }

    /// Mask of the lanes `p < n` of a `lanes`-lane register (`lanes <= 16`).
    #[inline(always)]
    fn lanes_below(n: isize, lanes: usize) -> u32 {
        (1u32 << n.clamp(0, lanes as isize)) - 1
    }

    #[inline(always)]
    unsafe fn csa(a: __m512i, b: __m512i, c: __m512i) -> (__m512i, __m512i) {
        (_mm512_ternarylogic_epi64::<XOR3>(a, b, c), _mm512_ternarylogic_epi64::<MAJ3>(a, b, c))
    }

    /// As the scalar `count9`.
    #[inline(always)]
    unsafe fn count9(f: &[__m512i; 9]) -> [__m512i; 4] {
        let (s1, c1) = csa(f[0], f[1], f[2]);
        let (s2, c2) = csa(f[3], f[4], f[5]);
        let (s3, c3) = csa(f[6], f[7], f[8]);
        let (ones, c4) = csa(s1, s2, s3);
        let (t, c5) = csa(c1, c2, c3);
        let (twos, c6) = (_mm512_xor_si512(t, c4), _mm512_and_si512(t, c4));
        let (fours, eights) = (_mm512_xor_si512(c5, c6), _mm512_and_si512(c5, c6));
        [ones, twos, fours, eights]
    }

    /// [`row_packed`] for at most 32 channels (one half-used word per pixel): 16 output
    /// pixels per register on 32-bit lanes, the same arithmetic lane for lane.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn row_packed32(
        g: &ConvGeom,
        x: &[u64],
        w: &[u64],
        thr: &DwThresholds,
        out: &mut [u64],
        row: usize,
    ) {
        debug_assert!(g.cin <= 32);
        let c = g.cin;
        let (b, oy) = (row / g.oh, row % g.oh);
        let xi = &x[b * g.h * g.w..][..g.h * g.w];
        let (ky0, ky1) = valid_taps(oy, g.stride, g.pad, 3, g.h);
        let rows_valid = ky1 - ky0;
        let st = g.stride as i32;
        let in_lanes = _mm512_setr_epi32(
            0,
            st,
            2 * st,
            3 * st,
            4 * st,
            5 * st,
            6 * st,
            7 * st,
            8 * st,
            9 * st,
            10 * st,
            11 * st,
            12 * st,
            13 * st,
            14 * st,
            15 * st,
        );
        let xp = xi.as_ptr() as *const i64;
        let (lo, hi) = tap_columns(g);
        let pad = g.pad as isize;
        let below = |n: isize| lanes_below(n, 16) as u16;
        let tables: [__m512i; 4] = std::array::from_fn(|p| _mm512_loadu_si512(thr.by_taps32[p].as_ptr() as *const _));
        let nn = _mm512_set1_epi32(thr.not_negative[0] as u32 as i32);
        let wm = _mm512_set1_epi32(word_mask(c, 0) as u32 as i32);
        let mut ox0 = 0;
        while ox0 < g.ow {
            let np = (g.ow - ox0).min(16);
            let kstore = below(np as isize);
            let o0 = ox0 as isize;
            let kcol: [u16; 3] = std::array::from_fn(|kx| below(hi[kx] - o0) & !below(lo[kx] - o0) & kstore);
            let all9 = rows_valid == 3 && kcol.iter().all(|&k| k == kstore);
            let mut v = _mm512_setzero_si512();
            if !all9 {
                let one = _mm512_set1_epi32(1);
                let cols = kcol
                    .iter()
                    .fold(_mm512_setzero_si512(), |a, &k| _mm512_add_epi32(a, _mm512_maskz_mov_epi32(k, one)));
                for _ in 0..rows_valid {
                    v = _mm512_add_epi32(v, cols);
                }
            }
            let mut f = [_mm512_setzero_si512(); 9];
            for ky in 0..3 {
                if ky < ky0 || ky >= ky1 {
                    continue;
                }
                let iy = oy * g.stride + ky - g.pad;
                for kx in 0..3 {
                    let k = kcol[kx];
                    if k == 0 {
                        continue;
                    }
                    let wv = _mm512_set1_epi32(w[ky * 3 + kx] as u32 as i32);
                    // Word of lane 0 (may lie before the image: that lane is masked).
                    let base = (iy * g.w + ox0 * g.stride) as isize + kx as isize - pad;
                    let xv = if g.stride == 1 {
                        // Two runs of 8 words, each narrowed to its low halves.
                        let l = _mm512_maskz_loadu_epi64(k as u8, xp.wrapping_offset(base));
                        let h = _mm512_maskz_loadu_epi64((k >> 8) as u8, xp.wrapping_offset(base + 8));
                        _mm512_inserti64x4::<1>(
                            _mm512_castsi256_si512(_mm512_cvtepi64_epi32(l)),
                            _mm512_cvtepi64_epi32(h),
                        )
                    } else {
                        // The low half of each word (little-endian): 32-bit gathers, scale 8.
                        let idx = _mm512_add_epi32(_mm512_set1_epi32(base as i32), in_lanes);
                        _mm512_mask_i32gather_epi32::<8>(_mm512_setzero_si512(), k, idx, xp as *const i32)
                    };
                    f[ky * 3 + kx] = _mm512_maskz_ternarylogic_epi32::<XNOR_AB>(k, xv, wv, wv);
                }
            }
            let a = count9(&f);
            let mut borrow = _mm512_setzero_si512();
            for (plane, &ap) in a.iter().enumerate() {
                let k = if all9 {
                    _mm512_set1_epi32(thr.planes[9][plane] as u32 as i32)
                } else {
                    _mm512_permutexvar_epi32(v, tables[plane])
                };
                borrow = _mm512_ternarylogic_epi64::<BORROW>(ap, k, borrow);
            }
            let bits = _mm512_ternarylogic_epi64::<OUT>(borrow, nn, wm);
            // Widen the 16 half-words back to one word per pixel.
            let op = out.as_mut_ptr().add(ox0) as *mut i64;
            _mm512_mask_storeu_epi64(op, kstore as u8, _mm512_cvtepu32_epi64(_mm512_castsi512_si256(bits)));
            _mm512_mask_storeu_epi64(
                op.wrapping_add(8),
                (kstore >> 8) as u8,
                _mm512_cvtepu32_epi64(_mm512_extracti64x4_epi64::<1>(bits)),
            );
            ox0 += 16;
        }
    }

    /// One output row (`row = b * oh + oy`; `out`: `ow * words(c)` words).
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn row_packed(
        g: &ConvGeom,
        x: &[u64],
        w: &[u64],
        thr: &DwThresholds,
        out: &mut [u64],
        row: usize,
    ) {
        let (c, wd) = (g.cin, words(g.cin));
        let (b, oy) = (row / g.oh, row % g.oh);
        let xi = &x[b * g.h * g.w * wd..][..g.h * g.w * wd];
        let (ky0, ky1) = valid_taps(oy, g.stride, g.pad, 3, g.h);
        let rows_valid = ky1 - ky0;
        let contiguous = wd == 1 && g.stride == 1;
        let st = (g.stride * wd) as i64;
        let in_lanes = _mm512_setr_epi64(0, st, 2 * st, 3 * st, 4 * st, 5 * st, 6 * st, 7 * st);
        let o = wd as i64;
        let out_lanes = _mm512_setr_epi64(0, o, 2 * o, 3 * o, 4 * o, 5 * o, 6 * o, 7 * o);
        let xp = xi.as_ptr() as *const i64;
        let (lo, hi) = tap_columns(g);
        let below = |n: isize| lanes_below(n, 8) as u8;
        let mut ox0 = 0;
        while ox0 < g.ow {
            let np = (g.ow - ox0).min(8);
            let kstore = below(np as isize);
            let o0 = ox0 as isize;
            let kcol: [u8; 3] = std::array::from_fn(|kx| below(hi[kx] - o0) & !below(lo[kx] - o0) & kstore);
            let all9 = rows_valid == 3 && kcol.iter().all(|&k| k == kstore);
            // Valid taps per lane (border chunks only): rows_valid * (valid columns).
            let mut v = _mm512_setzero_si512();
            if !all9 {
                let one = _mm512_set1_epi64(1);
                let cols = kcol
                    .iter()
                    .fold(_mm512_setzero_si512(), |a, &k| _mm512_add_epi64(a, _mm512_maskz_mov_epi64(k, one)));
                for _ in 0..rows_valid {
                    v = _mm512_add_epi64(v, cols);
                }
            }
            for wi in 0..wd {
                let mut f = [_mm512_setzero_si512(); 9];
                // Constant trip counts, so the nine tap vectors stay in registers.
                for ky in 0..3 {
                    if ky < ky0 || ky >= ky1 {
                        continue;
                    }
                    let iy = oy * g.stride + ky - g.pad;
                    for kx in 0..3 {
                        let k = kcol[kx];
                        if k == 0 {
                            continue;
                        }
                        let wv = _mm512_set1_epi64(w[(ky * 3 + kx) * wd + wi] as i64);
                        // Input word of lane 0 (may lie before the image: that lane is masked).
                        let base = ((iy * g.w + ox0 * g.stride) as isize + kx as isize - g.pad as isize) * wd as isize
                            + wi as isize;
                        let xv = if contiguous {
                            _mm512_maskz_loadu_epi64(k, xp.wrapping_offset(base))
                        } else {
                            let idx = _mm512_add_epi64(_mm512_set1_epi64(base as i64), in_lanes);
                            _mm512_mask_i64gather_epi64::<8>(_mm512_setzero_si512(), k, idx, xp)
                        };
                        f[ky * 3 + kx] = _mm512_maskz_ternarylogic_epi64::<XNOR_AB>(k, xv, wv, wv);
                    }
                }
                let a = count9(&f);
                // Interior chunks: the 9-tap bound for every lane. Border chunks: each lane's
                // bound picked from the word's 10-entry table by its tap count.
                let bound = |plane: usize| -> __m512i {
                    if all9 {
                        _mm512_set1_epi64(thr.planes[9 * wd + wi][plane] as i64)
                    } else {
                        let t = thr.by_taps[wi * 4 + plane].as_ptr() as *const i64;
                        _mm512_permutex2var_epi64(_mm512_loadu_epi64(t), v, _mm512_loadu_epi64(t.add(8)))
                    }
                };
                let mut borrow = _mm512_setzero_si512();
                for (plane, &ap) in a.iter().enumerate() {
                    borrow = _mm512_ternarylogic_epi64::<BORROW>(ap, bound(plane), borrow);
                }
                let bits = _mm512_ternarylogic_epi64::<OUT>(
                    borrow,
                    _mm512_set1_epi64(thr.not_negative[wi] as i64),
                    _mm512_set1_epi64(word_mask(c, wi) as i64),
                );
                let op = out.as_mut_ptr().add(ox0 * wd + wi) as *mut i64;
                if wd == 1 {
                    _mm512_mask_storeu_epi64(op, kstore, bits);
                } else {
                    _mm512_mask_i64scatter_epi64::<8>(op, kstore, out_lanes, bits);
                }
            }
            ox0 += 8;
        }
    }
}

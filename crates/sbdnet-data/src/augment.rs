//! Pure augmentation helpers. The caller draws the random numbers, so training
//! stays reproducible.

/// Copy `src` (an `h` x `w` x `c` HWC image) into `dst` shifted:
/// `dst(y, x) = src(y + dy, x + dx)`, zero outside the source. With `dy`, `dx`
/// in `-p..=p` this is "pad by `p`, then random crop". When `flip` is set the
/// result is mirrored horizontally (after the shift).
///
/// # Panics
/// If `src` or `dst` is shorter than `h * w * c` (a caller bug, not bad data).
#[allow(clippy::too_many_arguments)]
pub fn shift_flip(src: &[f32], dst: &mut [f32], h: usize, w: usize, c: usize, dy: isize, dx: isize, flip: bool) {
    let len = h * w * c;
    assert!(src.len() >= len && dst.len() >= len, "shift_flip: buffers shorter than h*w*c");
    for y in 0..h {
        let sy = y as isize + dy;
        for x in 0..w {
            let xs = if flip { w - 1 - x } else { x };
            let sx = xs as isize + dx;
            let out = &mut dst[(y * w + x) * c..(y * w + x + 1) * c];
            if sy >= 0 && (sy as usize) < h && sx >= 0 && (sx as usize) < w {
                let i = (sy as usize * w + sx as usize) * c;
                out.copy_from_slice(&src[i..i + c]);
            } else {
                out.fill(0.0);
            }
        }
    }
}

/// Normalize HWC u8 pixels to f32: `(p / 255 - mean[ch]) / std[ch]`, where
/// the channel is `index % mean.len()`.
///
/// # Panics
/// If `dst.len() != src.len()`, `mean` is empty or `mean` and `std` differ in
/// length (caller bugs).
pub fn normalize_into(src: &[u8], dst: &mut [f32], mean: &[f32], std: &[f32]) {
    assert_eq!(src.len(), dst.len(), "normalize_into: length mismatch");
    assert!(!mean.is_empty() && mean.len() == std.len(), "normalize_into: mean/std must be non-empty and equally long");
    let c = mean.len();
    let inv: Vec<f32> = std.iter().map(|s| 1.0 / s).collect();
    for (i, (d, &p)) in dst.iter_mut().zip(src).enumerate() {
        let ch = i % c;
        *d = (f32::from(p) / 255.0 - mean[ch]) * inv[ch];
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const IMG: [f32; 9] = [1., 2., 3., 4., 5., 6., 7., 8., 9.];

    fn run(dy: isize, dx: isize, flip: bool) -> [f32; 9] {
        let mut d = [f32::NAN; 9];
        shift_flip(&IMG, &mut d, 3, 3, 1, dy, dx, flip);
        d
    }

    #[test]
    fn shifts_and_flips() {
        assert_eq!(run(0, 0, false), IMG);
        assert_eq!(run(1, 0, false), [4., 5., 6., 7., 8., 9., 0., 0., 0.]);
        assert_eq!(run(0, -1, false), [0., 1., 2., 0., 4., 5., 0., 7., 8.]);
        assert_eq!(run(0, 0, true), [3., 2., 1., 6., 5., 4., 9., 8., 7.]);
        // Flip after shift: shifted rows [2,3,0] mirrored -> [0,3,2].
        assert_eq!(run(0, 1, true), [0., 3., 2., 0., 6., 5., 0., 9., 8.]);
        assert_eq!(run(-1, 1, false), [0., 0., 0., 2., 3., 0., 5., 6., 0.]);
        assert_eq!(run(5, 0, false), [0.; 9]);
    }

    #[test]
    fn shift_multichannel() {
        let src: Vec<f32> = (0..8).map(|v| v as f32).collect(); // 2x2x2
        let mut d = vec![0.0; 8];
        shift_flip(&src, &mut d, 2, 2, 2, 0, 0, true);
        assert_eq!(d, [2., 3., 0., 1., 6., 7., 4., 5.]);
    }

    #[test]
    fn normalizes() {
        let mut d = [0.0; 4];
        normalize_into(&[0, 255, 51, 255], &mut d, &[0.0, 0.5], &[1.0, 0.25]);
        let want = [0.0, 2.0, 0.2, 2.0];
        for (a, b) in d.iter().zip(want) {
            assert!((a - b).abs() < 1e-6, "{d:?}");
        }
    }
}

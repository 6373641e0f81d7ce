//! The 8x8 handwritten digits (1,797 images), embedded in the crate.

use std::io::Read;

use crate::{DataError, Dataset, Split};

static DIGITS_CSV_GZ: &[u8] = include_bytes!("../data/digits.csv.gz");

/// Number of images held out for the test split.
const TEST_SIZE: usize = 360;
/// Seed of the fixed shuffle that defines the split.
const SPLIT_SEED: u64 = 0x005b_d2e7_d161_7500;

/// A tiny splitmix64 generator, enough for a reproducible shuffle.
struct SplitMix64(u64);

impl SplitMix64 {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
}

fn parse_csv(text: &str) -> Result<(Vec<u8>, Vec<u8>), DataError> {
    let mut images = Vec::new();
    let mut labels = Vec::new();
    for (row, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
        let bad = |what: String| DataError::format(format!("digits row {}: {what}", row + 1));
        let vals = line
            .split(',')
            .map(|f| f.trim().parse::<u8>())
            .collect::<Result<Vec<u8>, _>>()
            .map_err(|e| bad(format!("{e}")))?;
        if vals.len() != 65 {
            return Err(bad(format!("{} fields, expected 65", vals.len())));
        }
        for &v in &vals[..64] {
            if v > 16 {
                return Err(bad(format!("pixel {v} outside 0..=16")));
            }
            images.push(((u32::from(v) * 255 + 8) / 16) as u8);
        }
        if vals[64] > 9 {
            return Err(bad(format!("label {} outside 0..=9", vals[64])));
        }
        labels.push(vals[64]);
    }
    Ok((images, labels))
}

/// The embedded digits data set (8x8x1, 10 classes, pixels scaled to 0..=255),
/// split deterministically: after a fixed-seed shuffle the last 360 images are
/// the test set and the other 1,437 the training set.
pub fn digits() -> Result<Split, DataError> {
    let mut text = String::new();
    flate2::read::GzDecoder::new(DIGITS_CSV_GZ)
        .read_to_string(&mut text)
        .map_err(|e| DataError::format(format!("embedded digits data is corrupt: {e}")))?;
    let (images, labels) = parse_csv(&text)?;
    let n = labels.len();
    if n <= TEST_SIZE {
        return Err(DataError::format(format!("embedded digits has only {n} rows")));
    }
    let mut order: Vec<usize> = (0..n).collect();
    let mut rng = SplitMix64(SPLIT_SEED);
    for i in (1..n).rev() {
        let j = (rng.next() % (i as u64 + 1)) as usize;
        order.swap(i, j);
    }
    let take = |idx: &[usize]| Dataset {
        images: idx.iter().flat_map(|&i| images[i * 64..(i + 1) * 64].iter().copied()).collect(),
        labels: idx.iter().map(|&i| labels[i]).collect(),
        height: 8,
        width: 8,
        channels: 1,
        classes: 10,
        name: "digits".to_string(),
    };
    let (tr, te) = order.split_at(n - TEST_SIZE);
    Ok(Split { train: take(tr), test: take(te) })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_labels_and_determinism() {
        let s = digits().unwrap();
        assert_eq!(s.train.len() + s.test.len(), 1797);
        assert_eq!((s.train.len(), s.test.len()), (1437, 360));
        assert_eq!(s.train.images.len(), 1437 * 64);
        assert_eq!(s.test.image_len(), 64);
        for d in [&s.train, &s.test] {
            let mut seen = [false; 10];
            d.labels.iter().for_each(|&l| seen[usize::from(l)] = true);
            assert!(seen.iter().all(|&b| b), "all classes present in {}", d.name);
        }
        assert_eq!(*s.train.images.iter().max().unwrap(), 255);
        let again = digits().unwrap();
        assert_eq!(s.train.labels, again.train.labels);
        assert_eq!(s.test.images, again.test.images);
        // The split is shuffled, not the file order.
        assert_ne!(&s.test.labels[..20], &s.train.labels[..20]);
    }

    #[test]
    fn csv_errors() {
        assert!(parse_csv("1,2,3").is_err());
        let mut row = vec!["0"; 64];
        row.push("3");
        assert_eq!(parse_csv(&row.join(",")).unwrap().1, vec![3]);
        row[0] = "17";
        assert!(parse_csv(&row.join(",")).is_err());
        row[0] = "16";
        row[64] = "10";
        assert!(parse_csv(&row.join(",")).is_err());
    }

    #[test]
    fn splitmix_reference() {
        // First output of splitmix64 seeded with 0.
        assert_eq!(SplitMix64(0).next(), 0xe220_a839_7b1d_cdaf);
    }
}

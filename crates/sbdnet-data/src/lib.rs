//! Data sets for sbdnet: MNIST and Fashion-MNIST (IDX files, raw or gzip),
//! CIFAR-10 (binary version), and the 8x8 digits embedded in the crate; pure
//! augmentation helpers; and fetching/verification of the installable sets.
//!
//! Images are kept as `u8` in HWC order (row-major, channels last).
//!
//! ```
//! use sbdnet_data::{load, DatasetKind};
//!
//! let kind: DatasetKind = "digits".parse()?;
//! let split = load(kind, &sbdnet_data::default_data_dir())?; // embedded: no files needed
//! assert_eq!(split.train.len() + split.test.len(), 1797);
//! let padded = split.test.pad_to(10, 10)?;
//! assert_eq!(padded.image_len(), 100);
//! # Ok::<(), sbdnet_data::DataError>(())
//! ```
#![deny(missing_docs)]

mod augment;
mod cifar;
mod digits;
mod error;
mod fetch;
mod idx;

pub use augment::{normalize_into, shift_flip};
pub use cifar::parse_cifar_records;
pub use digits::digits;
pub use error::DataError;
pub use fetch::{fetch, verify};
pub use idx::{parse_idx_images, parse_idx_labels, read_idx_images, read_idx_labels};

use std::path::{Path, PathBuf};

/// An in-memory labelled image data set, images stored as u8 in HWC order
/// (row-major, channels last).
#[derive(Clone, Debug)]
pub struct Dataset {
    /// Pixels, `n * height * width * channels` bytes.
    pub images: Vec<u8>,
    /// One label per image, each below `classes`.
    pub labels: Vec<u8>,
    /// Image height.
    pub height: usize,
    /// Image width.
    pub width: usize,
    /// Channels per pixel.
    pub channels: usize,
    /// Number of classes.
    pub classes: usize,
    /// Data set name (e.g. `mnist`).
    pub name: String,
}

impl Dataset {
    /// Number of images.
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    /// Whether there are no images.
    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    /// Bytes per image: `height * width * channels`.
    pub fn image_len(&self) -> usize {
        self.height * self.width * self.channels
    }

    /// The pixels of image `i` (HWC).
    ///
    /// # Panics
    /// If `i >= self.len()`.
    pub fn image(&self, i: usize) -> &[u8] {
        let l = self.image_len();
        &self.images[i * l..(i + 1) * l]
    }

    /// Zero-pad every image to `new_h` x `new_w`, centred (e.g. 28x28 to
    /// 32x32). Errors if the new size is smaller than the current one.
    pub fn pad_to(&self, new_h: usize, new_w: usize) -> Result<Dataset, DataError> {
        if new_h < self.height || new_w < self.width {
            return Err(DataError::Invalid(format!(
                "cannot pad {}x{} images to the smaller size {new_h}x{new_w}; choose at least the current size",
                self.height, self.width
            )));
        }
        let (c, n) = (self.channels, self.len());
        let (top, left) = ((new_h - self.height) / 2, (new_w - self.width) / 2);
        let row = self.width * c;
        let mut images = vec![0u8; n * new_h * new_w * c];
        for (i, src) in self.images.chunks_exact(self.image_len().max(1)).take(n).enumerate() {
            let dst = &mut images[i * new_h * new_w * c..(i + 1) * new_h * new_w * c];
            for (y, src_row) in src.chunks_exact(row.max(1)).enumerate() {
                let o = ((top + y) * new_w + left) * c;
                dst[o..o + row].copy_from_slice(src_row);
            }
        }
        Ok(Dataset { images, height: new_h, width: new_w, ..self.clone_meta() })
    }

    fn clone_meta(&self) -> Dataset {
        Dataset {
            images: Vec::new(),
            labels: self.labels.clone(),
            height: self.height,
            width: self.width,
            channels: self.channels,
            classes: self.classes,
            name: self.name.clone(),
        }
    }

    /// Per-channel mean and standard deviation of `pixel / 255` over all
    /// images. An empty data set gives mean 0 and std 1; the std is clamped to
    /// at least `1e-6` so that dividing by it is safe.
    pub fn channel_stats(&self) -> (Vec<f32>, Vec<f32>) {
        let c = self.channels.max(1);
        let mut sum = vec![0f64; c];
        let mut sq = vec![0f64; c];
        for (i, &p) in self.images.iter().enumerate() {
            let v = f64::from(p) / 255.0;
            sum[i % c] += v;
            sq[i % c] += v * v;
        }
        let count = (self.images.len() / c) as f64;
        if count == 0.0 {
            return (vec![0.0; c], vec![1.0; c]);
        }
        let mean: Vec<f32> = sum.iter().map(|s| (s / count) as f32).collect();
        let std = sum
            .iter()
            .zip(&sq)
            .map(|(s, q)| {
                let m = s / count;
                ((q / count - m * m).max(0.0).sqrt() as f32).max(1e-6)
            })
            .collect();
        (mean, std)
    }
}

/// Train and test split.
#[derive(Clone, Debug)]
pub struct Split {
    /// Training set.
    pub train: Dataset,
    /// Test set.
    pub test: Dataset,
}

/// Which data set.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DatasetKind {
    /// The 8x8 digits embedded in the crate (1,797 images).
    Digits,
    /// MNIST handwritten digits, 28x28.
    Mnist,
    /// Fashion-MNIST, 28x28.
    FashionMnist,
    /// CIFAR-10, 32x32x3.
    Cifar10,
}

impl DatasetKind {
    /// The canonical name, also the directory name under the data dir.
    pub fn name(&self) -> &'static str {
        match self {
            DatasetKind::Digits => "digits",
            DatasetKind::Mnist => "mnist",
            DatasetKind::FashionMnist => "fashion-mnist",
            DatasetKind::Cifar10 => "cifar10",
        }
    }

    /// Number of classes (10 for all).
    pub fn classes(&self) -> usize {
        10
    }

    /// Whether horizontal flips are a sensible augmentation (not for digits).
    pub fn hflip_makes_sense(&self) -> bool {
        matches!(self, DatasetKind::FashionMnist | DatasetKind::Cifar10)
    }
}

impl std::fmt::Display for DatasetKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for DatasetKind {
    type Err = DataError;

    fn from_str(s: &str) -> Result<Self, DataError> {
        match s.trim().to_ascii_lowercase().as_str() {
            "digits" => Ok(DatasetKind::Digits),
            "mnist" => Ok(DatasetKind::Mnist),
            "fashion-mnist" | "fashion_mnist" | "fmnist" => Ok(DatasetKind::FashionMnist),
            "cifar10" | "cifar-10" => Ok(DatasetKind::Cifar10),
            _ => Err(DataError::UnknownKind(s.to_string())),
        }
    }
}

/// Load a split. Digits is embedded and ignores `data_dir`; the others read
/// from `data_dir/<name>/`. Checksums are not verified here (see [`verify`]).
pub fn load(kind: DatasetKind, data_dir: &Path) -> Result<Split, DataError> {
    let dir = data_dir.join(kind.name());
    let split = match kind {
        DatasetKind::Digits => digits(),
        DatasetKind::Mnist | DatasetKind::FashionMnist => idx::load_idx_dir(kind.name(), &dir),
        DatasetKind::Cifar10 => cifar::load_cifar_dir(&dir),
    }?;
    // Valid but empty files (an IDX header with count 0, an empty CIFAR batch) would give
    // an accuracy over no images.
    for (part, d) in [("training", &split.train), ("test", &split.test)] {
        if d.is_empty() {
            return Err(DataError::Format { file: dir, reason: format!("its {part} split has no images") });
        }
    }
    Ok(split)
}

/// The data directory: `$SBDNET_DATA` if set, else `$XDG_CACHE_HOME/sbdnet`,
/// else `$HOME/.cache/sbdnet`, else `./.sbdnet-data`.
pub fn default_data_dir() -> PathBuf {
    let var = |k: &str| std::env::var_os(k).filter(|v| !v.is_empty()).map(PathBuf::from);
    if let Some(d) = var("SBDNET_DATA") {
        d
    } else if let Some(d) = var("XDG_CACHE_HOME") {
        d.join("sbdnet")
    } else if let Some(d) = var("HOME") {
        d.join(".cache").join("sbdnet")
    } else {
        PathBuf::from(".sbdnet-data")
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::idx::tests::{gzip, idx_images, idx_labels};

    /// A temporary directory removed on drop.
    pub(crate) struct TempDir(pub PathBuf);

    impl TempDir {
        pub(crate) fn new(tag: &str) -> Self {
            use std::sync::atomic::{AtomicUsize, Ordering};
            static N: AtomicUsize = AtomicUsize::new(0);
            let p = std::env::temp_dir().join(format!(
                "sbdnet-data-test-{tag}-{}-{}",
                std::process::id(),
                N.fetch_add(1, Ordering::Relaxed)
            ));
            let _ = std::fs::remove_dir_all(&p);
            std::fs::create_dir_all(&p).unwrap();
            TempDir(p)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    /// Write a small MNIST-format directory (5 train, 3 test images of 4x4);
    /// the label files are gzipped when `gz`.
    pub(crate) fn write_mnist(dir: &Path, gz: bool) {
        std::fs::create_dir_all(dir).unwrap();
        let w = |name: &str, bytes: Vec<u8>, z: bool| {
            if z {
                std::fs::write(dir.join(format!("{name}.gz")), gzip(&bytes)).unwrap();
            } else {
                std::fs::write(dir.join(name), bytes).unwrap();
            }
        };
        w("train-images-idx3-ubyte", idx_images(5, 4, 4), false);
        w("train-labels-idx1-ubyte", idx_labels(&[0, 1, 2, 3, 9]), gz);
        w("t10k-images-idx3-ubyte", idx_images(3, 4, 4), gz);
        w("t10k-labels-idx1-ubyte", idx_labels(&[5, 6, 7]), gz);
    }

    #[test]
    fn empty_splits_are_refused() {
        let t = TempDir::new("empty");
        let dir = t.0.join("mnist");
        write_mnist(&dir, false);
        std::fs::write(dir.join("t10k-images-idx3-ubyte"), idx_images(0, 4, 4)).unwrap();
        std::fs::write(dir.join("t10k-labels-idx1-ubyte"), idx_labels(&[])).unwrap();
        let err = load(DatasetKind::Mnist, &t.0).unwrap_err().to_string();
        assert!(err.contains("test split has no images") && err.contains("mnist"), "{err}");
    }

    #[test]
    fn kind_parsing() {
        for (s, k) in [
            ("digits", DatasetKind::Digits),
            ("mnist", DatasetKind::Mnist),
            ("fashion-mnist", DatasetKind::FashionMnist),
            ("fashion_mnist", DatasetKind::FashionMnist),
            ("fmnist", DatasetKind::FashionMnist),
            ("cifar10", DatasetKind::Cifar10),
            ("CIFAR-10", DatasetKind::Cifar10),
        ] {
            assert_eq!(s.parse::<DatasetKind>().unwrap(), k);
            assert_eq!(k.name().parse::<DatasetKind>().unwrap(), k);
        }
        let err = "imagenet".parse::<DatasetKind>().unwrap_err().to_string();
        assert!(err.contains("imagenet") && err.contains("fashion-mnist"), "{err}");
        assert!(DatasetKind::Cifar10.hflip_makes_sense());
        assert!(!DatasetKind::Mnist.hflip_makes_sense());
        assert_eq!(DatasetKind::Digits.classes(), 10);
    }

    #[test]
    fn pad_and_stats() {
        let d = Dataset {
            images: vec![10, 20, 30, 40, 1, 2, 3, 4],
            labels: vec![0, 1],
            height: 2,
            width: 2,
            channels: 1,
            classes: 10,
            name: "t".into(),
        };
        let p = d.pad_to(4, 5).unwrap();
        assert_eq!((p.height, p.width, p.len()), (4, 5, 2));
        #[rustfmt::skip]
        let want = [0, 0, 0, 0, 0,
                    0, 1, 2, 0, 0,
                    0, 3, 4, 0, 0,
                    0, 0, 0, 0, 0];
        assert_eq!(p.image(1), want);
        assert_eq!(p.image(0).iter().map(|&v| u32::from(v)).sum::<u32>(), 100);
        assert!(d.pad_to(1, 2).is_err());

        let c = Dataset { images: vec![0, 255, 255, 255], channels: 2, height: 1, width: 1, ..d.clone() };
        let (m, s) = c.channel_stats();
        assert!((m[0] - 0.5).abs() < 1e-6 && (m[1] - 1.0).abs() < 1e-6, "{m:?}");
        assert!((s[0] - 0.5).abs() < 1e-6 && s[1] == 1e-6, "{s:?}");
    }

    #[test]
    fn load_missing_says_fetch() {
        let tmp = TempDir::new("missing");
        for kind in [DatasetKind::Mnist, DatasetKind::FashionMnist] {
            let err = load(kind, &tmp.0).unwrap_err();
            assert!(matches!(&err, DataError::NotInstalled { name, .. } if name == kind.name()));
            let msg = err.to_string();
            let hint = format!("run `sbdnet data fetch {}`", kind.name());
            assert!(msg.contains(&hint) && msg.contains("--data-dir"), "{msg}");
        }
        // One file missing.
        write_mnist(&tmp.0.join("mnist"), false);
        std::fs::remove_file(tmp.0.join("mnist/t10k-labels-idx1-ubyte")).unwrap();
        assert!(matches!(load(DatasetKind::Mnist, &tmp.0), Err(DataError::NotInstalled { .. })));
    }

    #[test]
    fn load_generated_mnist() {
        for gz in [false, true] {
            let tmp = TempDir::new("mnist");
            write_mnist(&tmp.0.join("fashion-mnist"), gz);
            let s = load(DatasetKind::FashionMnist, &tmp.0).unwrap();
            assert_eq!((s.train.len(), s.test.len()), (5, 3));
            assert_eq!((s.train.height, s.train.width, s.train.channels), (4, 4, 1));
            assert_eq!(s.train.labels, [0, 1, 2, 3, 9]);
            assert_eq!(s.test.image(2)[0], 32);
            assert_eq!(s.test.name, "fashion-mnist");
        }
        // Count mismatch and bad label.
        let tmp = TempDir::new("mnist-bad");
        let dir = tmp.0.join("mnist");
        write_mnist(&dir, false);
        std::fs::write(dir.join("t10k-labels-idx1-ubyte"), idx_labels(&[1, 2])).unwrap();
        assert!(matches!(load(DatasetKind::Mnist, &tmp.0), Err(DataError::Format { .. })));
        std::fs::write(dir.join("t10k-labels-idx1-ubyte"), idx_labels(&[1, 2, 10])).unwrap();
        let err = load(DatasetKind::Mnist, &tmp.0).unwrap_err().to_string();
        assert!(err.contains("label 10"), "{err}");
    }

    #[test]
    fn data_dir_is_absolute_or_fallback() {
        let d = default_data_dir();
        assert!(!d.as_os_str().is_empty());
    }
}

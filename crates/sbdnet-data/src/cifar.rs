//! CIFAR-10 binary version: records of 1 label byte and 3x32x32 pixels (CHW).

use std::path::Path;

use crate::{DataError, Dataset, Split};

const SIDE: usize = 32;
const PLANE: usize = SIDE * SIDE;
/// Bytes per record: one label and 3 colour planes.
const RECORD: usize = 1 + 3 * PLANE;

/// Parse CIFAR-10 binary records into `(images, labels)`, images in HWC order
/// (32x32x3).
pub fn parse_cifar_records(bytes: &[u8]) -> Result<(Vec<u8>, Vec<u8>), DataError> {
    if !bytes.len().is_multiple_of(RECORD) {
        return Err(DataError::format(format!(
            "length {} is not a multiple of the {RECORD}-byte CIFAR-10 record",
            bytes.len()
        )));
    }
    let n = bytes.len() / RECORD;
    let mut images = Vec::with_capacity(n * 3 * PLANE);
    let mut labels = Vec::with_capacity(n);
    for (i, rec) in bytes.chunks_exact(RECORD).enumerate() {
        if rec[0] > 9 {
            return Err(DataError::format(format!("record {i} has label {}, expected 0..=9", rec[0])));
        }
        labels.push(rec[0]);
        let planes = &rec[1..];
        for p in 0..PLANE {
            images.extend_from_slice(&[planes[p], planes[PLANE + p], planes[2 * PLANE + p]]);
        }
    }
    Ok((images, labels))
}

fn read_batches(dir: &Path, files: &[String]) -> Result<Dataset, DataError> {
    let mut images = Vec::new();
    let mut labels = Vec::new();
    for f in files {
        let path = dir.join(f);
        let bytes = std::fs::read(&path).map_err(|e| DataError::io(&path, e))?;
        let (im, lb) = parse_cifar_records(&bytes).map_err(|e| e.in_file(&path))?;
        images.extend_from_slice(&im);
        labels.extend_from_slice(&lb);
    }
    Ok(Dataset { images, labels, height: SIDE, width: SIDE, channels: 3, classes: 10, name: "cifar10".to_string() })
}

/// The batch file names: five training batches and the test batch.
pub(crate) fn batch_files() -> (Vec<String>, String) {
    let train = (1..=5).map(|i| format!("data_batch_{i}.bin")).collect();
    (train, "test_batch.bin".to_string())
}

/// Find the directory that holds the batch files: `dir` itself or
/// `dir/cifar-10-batches-bin/`.
pub(crate) fn batch_dir(dir: &Path) -> Result<std::path::PathBuf, DataError> {
    let (train, test) = batch_files();
    let complete = |d: &Path| train.iter().chain([&test]).all(|f| d.join(f).is_file());
    for d in [dir.to_path_buf(), dir.join("cifar-10-batches-bin")] {
        if complete(&d) {
            return Ok(d);
        }
    }
    Err(DataError::NotInstalled { name: "cifar10".to_string(), dir: dir.to_path_buf() })
}

/// Load CIFAR-10 from `dir` (or `dir/cifar-10-batches-bin/`).
pub(crate) fn load_cifar_dir(dir: &Path) -> Result<Split, DataError> {
    let d = batch_dir(dir)?;
    let (train, test) = batch_files();
    Ok(Split { train: read_batches(&d, &train)?, test: read_batches(&d, &[test])? })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(label: u8, seed: u8) -> Vec<u8> {
        let mut r = vec![label];
        r.extend((0..3 * PLANE).map(|i| (i as u8).wrapping_mul(7).wrapping_add(seed)));
        r
    }

    #[test]
    fn converts_chw_to_hwc() {
        let mut bytes = record(3, 0);
        bytes.extend(record(9, 1));
        let (im, lb) = parse_cifar_records(&bytes).unwrap();
        assert_eq!(lb, vec![3, 9]);
        assert_eq!(im.len(), 2 * 3 * PLANE);
        // Pixel (y=2, x=5) of image 1, channel G: CHW offset 1 + PLANE + 2*32+5.
        let (y, x) = (2, 5);
        let chw = &bytes[RECORD..];
        for c in 0..3 {
            let want = chw[1 + c * PLANE + y * SIDE + x];
            assert_eq!(im[3 * PLANE + (y * SIDE + x) * 3 + c], want);
        }
    }

    #[test]
    fn rejects_bad_length_and_label() {
        let r = record(1, 0);
        assert!(parse_cifar_records(&r[..RECORD - 1]).is_err());
        assert!(parse_cifar_records(&record(10, 0)).is_err());
        assert_eq!(parse_cifar_records(&[]).unwrap().1.len(), 0);
    }

    #[test]
    fn loads_from_subdirectory() {
        let tmp = crate::tests::TempDir::new("cifar");
        let sub = tmp.0.join("cifar10").join("cifar-10-batches-bin");
        std::fs::create_dir_all(&sub).unwrap();
        let (train, test) = batch_files();
        for f in train.iter().chain([&test]) {
            std::fs::write(sub.join(f), record(4, 2)).unwrap();
        }
        let split = crate::load(crate::DatasetKind::Cifar10, &tmp.0).unwrap();
        assert_eq!((split.train.len(), split.test.len()), (5, 1));
        assert_eq!(split.train.image_len(), 32 * 32 * 3);
        let err = crate::load(crate::DatasetKind::Cifar10, &tmp.0.join("nope")).unwrap_err();
        assert!(err.to_string().contains("CIFAR-10 binary version"), "{err}");
    }
}

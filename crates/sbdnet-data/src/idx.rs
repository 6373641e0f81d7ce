//! IDX files (the MNIST / Fashion-MNIST format), raw or gzip-compressed.
//!
//! An IDX file starts with a magic number `00 00 08 <ndims>` (unsigned bytes),
//! followed by `ndims` big-endian `u32` dimensions and then the data.

use std::io::Read;
use std::path::Path;

use crate::DataError;

/// Deflate cannot expand data by more than about 1032:1, so a decompressed
/// size above this bound means the stream is corrupt (or a bomb).
const MAX_GZIP_RATIO: u64 = 1100;

/// Read a file, transparently decompressing it when it starts with the gzip
/// magic bytes `1f 8b` (the name does not matter).
pub(crate) fn read_maybe_gz(path: &Path) -> Result<Vec<u8>, DataError> {
    let raw = std::fs::read(path).map_err(|e| DataError::io(path, e))?;
    if !raw.starts_with(&[0x1f, 0x8b]) {
        return Ok(raw);
    }
    let limit = (raw.len() as u64).saturating_mul(MAX_GZIP_RATIO) + 1024;
    let mut out = Vec::new();
    flate2::read::MultiGzDecoder::new(&raw[..])
        .take(limit)
        .read_to_end(&mut out)
        .map_err(|e| DataError::format(format!("cannot decompress gzip data: {e}")).in_file(path))?;
    Ok(out)
}

/// Parse the IDX header; returns the dimensions and the payload.
fn parse_header(bytes: &[u8], ndims: usize) -> Result<(Vec<usize>, &[u8]), DataError> {
    if bytes.len() < 4 {
        return Err(DataError::format("file too short for an IDX header"));
    }
    if bytes[0] != 0 || bytes[1] != 0 || bytes[2] != 0x08 {
        return Err(DataError::format(format!(
            "bad IDX magic {:02x} {:02x} {:02x} (expected 00 00 08 for unsigned bytes)",
            bytes[0], bytes[1], bytes[2]
        )));
    }
    if usize::from(bytes[3]) != ndims {
        return Err(DataError::format(format!("IDX file has {} dimensions, expected {ndims}", bytes[3])));
    }
    let header_len = 4 + 4 * ndims;
    if bytes.len() < header_len {
        return Err(DataError::format("file truncated inside the IDX header"));
    }
    let dims: Vec<usize> =
        bytes[4..header_len].chunks_exact(4).map(|c| u32::from_be_bytes([c[0], c[1], c[2], c[3]]) as usize).collect();
    let payload = &bytes[header_len..];
    let expected = dims
        .iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d))
        .ok_or_else(|| DataError::format(format!("IDX dimensions {dims:?} overflow")))?;
    if expected != payload.len() {
        return Err(DataError::format(format!(
            "IDX dimensions {dims:?} need {expected} data bytes but the file holds {}",
            payload.len()
        )));
    }
    Ok((dims, payload))
}

/// Parse decompressed IDX image data (3 dimensions). Returns `(pixels, n, h, w)`.
pub fn parse_idx_images(bytes: &[u8]) -> Result<(Vec<u8>, usize, usize, usize), DataError> {
    let (dims, payload) = parse_header(bytes, 3)?;
    Ok((payload.to_vec(), dims[0], dims[1], dims[2]))
}

/// Parse decompressed IDX label data (1 dimension).
pub fn parse_idx_labels(bytes: &[u8]) -> Result<Vec<u8>, DataError> {
    let (_, payload) = parse_header(bytes, 1)?;
    Ok(payload.to_vec())
}

/// Read an IDX image file (raw or gzip). Returns `(pixels, n, h, w)`.
pub fn read_idx_images(path: &Path) -> Result<(Vec<u8>, usize, usize, usize), DataError> {
    parse_idx_images(&read_maybe_gz(path)?).map_err(|e| e.in_file(path))
}

/// Read an IDX label file (raw or gzip).
pub fn read_idx_labels(path: &Path) -> Result<Vec<u8>, DataError> {
    parse_idx_labels(&read_maybe_gz(path)?).map_err(|e| e.in_file(path))
}

/// The four IDX files of an MNIST-style directory, without any `.gz` suffix.
pub(crate) const IDX_FILES: [&str; 4] =
    ["train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"];

/// Find `dir/name` or `dir/name.gz`.
pub(crate) fn find_file(dir: &Path, name: &str) -> Option<std::path::PathBuf> {
    let raw = dir.join(name);
    if raw.is_file() {
        return Some(raw);
    }
    let gz = dir.join(format!("{name}.gz"));
    gz.is_file().then_some(gz)
}

/// Load an MNIST-style directory (10 classes).
pub(crate) fn load_idx_dir(name: &str, dir: &Path) -> Result<crate::Split, DataError> {
    let not_installed = || DataError::NotInstalled { name: name.to_string(), dir: dir.to_path_buf() };
    let mut paths = Vec::with_capacity(4);
    for f in IDX_FILES {
        paths.push(find_file(dir, f).ok_or_else(not_installed)?);
    }
    let part = |img: &Path, lab: &Path| -> Result<crate::Dataset, DataError> {
        let (images, n, height, width) = read_idx_images(img)?;
        let labels = read_idx_labels(lab)?;
        if labels.len() != n {
            return Err(
                DataError::format(format!("{n} images but {} labels in {}", labels.len(), lab.display())).in_file(img)
            );
        }
        if let Some(bad) = labels.iter().find(|&&l| l >= 10) {
            return Err(DataError::format(format!("label {bad} is not below 10")).in_file(lab));
        }
        Ok(crate::Dataset { images, labels, height, width, channels: 1, classes: 10, name: name.to_string() })
    };
    let train = part(&paths[0], &paths[1])?;
    let test = part(&paths[2], &paths[3])?;
    if (train.height, train.width) != (test.height, test.width) {
        return Err(DataError::format(format!(
            "test images are {}x{} but training images are {}x{}",
            test.height, test.width, train.height, train.width
        ))
        .in_file(&paths[2]));
    }
    Ok(crate::Split { train, test })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::io::Write;

    pub(crate) fn idx_images(n: u32, h: u32, w: u32) -> Vec<u8> {
        let mut v = vec![0, 0, 8, 3];
        for d in [n, h, w] {
            v.extend_from_slice(&d.to_be_bytes());
        }
        v.extend((0..n * h * w).map(|i| (i % 251) as u8));
        v
    }

    pub(crate) fn idx_labels(labels: &[u8]) -> Vec<u8> {
        let mut v = vec![0, 0, 8, 1];
        v.extend_from_slice(&(labels.len() as u32).to_be_bytes());
        v.extend_from_slice(labels);
        v
    }

    pub(crate) fn gzip(bytes: &[u8]) -> Vec<u8> {
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        e.write_all(bytes).unwrap();
        e.finish().unwrap()
    }

    #[test]
    fn parses_images_and_labels() {
        let (px, n, h, w) = parse_idx_images(&idx_images(2, 3, 4)).unwrap();
        assert_eq!((n, h, w), (2, 3, 4));
        assert_eq!(px.len(), 24);
        assert_eq!(px[5], 5);
        assert_eq!(parse_idx_labels(&idx_labels(&[1, 2, 9])).unwrap(), vec![1, 2, 9]);
    }

    #[test]
    fn rejects_bad_buffers() {
        let good = idx_images(2, 3, 4);
        assert!(parse_idx_images(&good[..good.len() - 1]).is_err()); // truncated
        assert!(parse_idx_images(&good[..10]).is_err()); // truncated header
        assert!(parse_idx_images(&[0, 0]).is_err());
        let mut bad = good.clone();
        bad[2] = 0x09;
        assert!(parse_idx_images(&bad).is_err()); // wrong type
        let mut bad = good.clone();
        bad[3] = 1;
        assert!(parse_idx_images(&bad).is_err()); // wrong ndims
        let mut long = good.clone();
        long.push(0);
        assert!(parse_idx_images(&long).is_err()); // dims vs length
        assert!(parse_idx_labels(&good).is_err()); // images as labels
                                                   // Huge dims must fail on the length check, without allocating.
        let mut huge = vec![0, 0, 8, 3];
        for _ in 0..3 {
            huge.extend_from_slice(&u32::MAX.to_be_bytes());
        }
        let err = parse_idx_images(&huge).unwrap_err();
        assert!(matches!(err, DataError::Format { .. }), "{err}");
        let mut huge = vec![0, 0, 8, 1];
        huge.extend_from_slice(&u32::MAX.to_be_bytes());
        assert!(parse_idx_labels(&huge).is_err());
    }

    #[test]
    fn reads_raw_and_gzip_files() {
        let dir = crate::tests::TempDir::new("idx");
        let raw = idx_images(3, 2, 2);
        std::fs::write(dir.0.join("a"), &raw).unwrap();
        // Gzip is detected by magic, not by name.
        std::fs::write(dir.0.join("b"), gzip(&raw)).unwrap();
        std::fs::write(dir.0.join("c.gz"), gzip(&idx_labels(&[4, 5]))).unwrap();
        let a = read_idx_images(&dir.0.join("a")).unwrap();
        let b = read_idx_images(&dir.0.join("b")).unwrap();
        assert_eq!(a, b);
        assert_eq!(read_idx_labels(&dir.0.join("c.gz")).unwrap(), vec![4, 5]);
        let mut corrupt = gzip(&raw);
        corrupt.truncate(corrupt.len() / 2);
        std::fs::write(dir.0.join("d"), corrupt).unwrap();
        let err = read_idx_images(&dir.0.join("d")).unwrap_err();
        assert!(err.to_string().contains("/d"), "{err}");
    }

    proptest::proptest! {
        #[test]
        fn never_panics(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..64)) {
            let _ = parse_idx_images(&bytes);
            let _ = parse_idx_labels(&bytes);
            let mut prefixed = vec![0, 0, 8];
            prefixed.extend_from_slice(&bytes);
            let _ = parse_idx_images(&prefixed);
            let _ = parse_idx_labels(&prefixed);
        }
    }
}

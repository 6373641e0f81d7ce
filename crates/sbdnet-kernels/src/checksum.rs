//! The checksum sbdnet files carry over their tensor data (deployed `.sbd` models and
//! training checkpoints, both safetensors containers), so flipped bits are refused at load
//! instead of being trained on or run. Writers put [`PLACEHOLDER`] under [`KEY`] in the
//! metadata, serialize, then [`seal`] the bytes in place (the data section does not depend on
//! the metadata, and the placeholder has the checksum's length, so nothing moves); readers
//! check it with [`verify`].

/// Metadata key of the checksum (16 hex digits of [`data_checksum`] over the data section).
pub const KEY: &str = "checksum";

/// What a writer stores under [`KEY`] before [`seal`] overwrites it (same length).
pub const PLACEHOLDER: &str = "0000000000000000";

/// A 64-bit checksum of `data`: for each 8-byte little-endian word `w` (the last one padded
/// with zeros), `h = (h xor w) * 0x100000001b3` from `h = 0xcbf29ce484222325` (FNV-1a's
/// prime and offset, on words: the prime is odd, so each step is a bijection of `h` and a
/// change to any single word always changes the result), then the length the same way.
/// Corruption detection, not authentication.
///
/// ```
/// use sbdnet_kernels::checksum::data_checksum;
/// let a = data_checksum(b"sign bits and thresholds");
/// assert_ne!(a, data_checksum(b"sign bits and thresholdt"));
/// assert_ne!(data_checksum(&[0; 8]), data_checksum(&[0; 9]));
/// ```
pub fn data_checksum(data: &[u8]) -> u64 {
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut words = data.chunks_exact(8);
    for w in &mut words {
        h = (h ^ u64::from_le_bytes(w.try_into().expect("8 bytes"))).wrapping_mul(PRIME);
    }
    let mut last = [0u8; 8];
    last[..words.remainder().len()].copy_from_slice(words.remainder());
    h = (h ^ u64::from_le_bytes(last)).wrapping_mul(PRIME);
    (h ^ data.len() as u64).wrapping_mul(PRIME)
}

/// The data section of a safetensors file (the bytes after its 8-byte header length and its
/// JSON header), if the header length fits in the file.
pub fn safetensors_data(bytes: &[u8]) -> Option<&[u8]> {
    let n = u64::from_le_bytes(bytes.get(..8)?.try_into().ok()?);
    bytes.get(8usize.checked_add(usize::try_from(n).ok()?)?..)
}

/// `format!("{:016x}", data_checksum(data section))` of a safetensors file: the value the
/// `checksum` metadata key holds.
pub fn safetensors_checksum(bytes: &[u8]) -> Option<String> {
    safetensors_data(bytes).map(|d| format!("{:016x}", data_checksum(d)))
}

/// Whether a safetensors file's data section matches the checksum its metadata stores under
/// [`KEY`] (`stored`); a file without one (written before checksums existed) passes.
pub fn verify(bytes: &[u8], stored: Option<&str>) -> bool {
    stored.is_none_or(|want| safetensors_checksum(bytes).as_deref() == Some(want))
}

/// Write the checksum of a serialized safetensors file's data section over the value stored
/// under [`KEY`] in its header (the [`PLACEHOLDER`], or a stale or damaged checksum); returns
/// whether the header holds the key. Never panics on arbitrary bytes (fuzzed).
pub fn seal(bytes: &mut [u8]) -> bool {
    let key = format!("\"{KEY}\":\"");
    let Some(n) = bytes.get(..8).map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes")) as usize) else {
        return false;
    };
    let (Some(sum), Some(end)) = (safetensors_checksum(bytes), n.checked_add(8)) else { return false };
    match bytes[8..end].windows(key.len()).position(|w| w == key.as_bytes()) {
        Some(p) if 8 + p + key.len() + PLACEHOLDER.len() <= end => {
            let at = 8 + p + key.len();
            bytes[at..at + PLACEHOLDER.len()].copy_from_slice(sum.as_bytes());
            true
        }
        _ => false,
    }
}

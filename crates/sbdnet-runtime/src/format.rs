//! The `.sbd` file: a safetensors container whose metadata holds the format tag, the version
//! and the layer graph ([`Graph`], JSON), and whose tensors are the packed weights (`U64` sign
//! words), group masks (`U8`), integer thresholds (`I32`) and folded per-channel parameters
//! (`F32`).
//!
//! Loading checks everything before anything else sees it: the safetensors header (offsets
//! inside the file, no overlaps), the format tag and version, the data section's checksum
//! ([`data_checksum`], so flipped bits in the packed weights are refused, not run), the graph
//! JSON, every tensor a
//! layer names (present, dtype, exact length for the declared shapes), shapes in range. The
//! only allocations are the file's bytes and copies of its tensors, so a hostile file cannot
//! ask for more memory than its own size, and the planner's buffers are bounded by
//! [`crate::graph::MAX_PIXELS`] and [`crate::graph::MAX_CHANNELS`].

use crate::error::RuntimeError;
use crate::graph::{Graph, TensorData, Tensors, ValueInfo, FORMAT_VERSION};
use safetensors::tensor::{Dtype, TensorView};
use std::collections::HashMap;
use std::path::Path;

/// Format tag in the metadata.
pub const FORMAT_TAG: &str = "sbdnet-model";

/// Metadata key of the data section's checksum ([`data_checksum`], 16 hex digits). Written by
/// every export; a file without it (exported before it existed) loads unchecked.
pub use sbdnet_kernels::checksum::KEY as CHECKSUM_KEY;

pub use sbdnet_kernels::checksum::data_checksum;
/// Rewrite the checksum stored in `.sbd` bytes (possibly damaged) to match their data section,
/// where the header still holds one; returns whether it did. Exports seal with it; tests and
/// fuzzing use it to let damaged tensor data reach the validation behind the checksum.
pub use sbdnet_kernels::checksum::seal as reseal;
use sbdnet_kernels::checksum::{verify, PLACEHOLDER};

/// A loaded, validated model: its graph, tensors, and every value's shape.
#[derive(Clone, Debug)]
pub struct DeployedModel {
    /// The layer graph.
    pub graph: Graph,
    /// Named tensors.
    pub tensors: Tensors,
    /// Shape and kind of every value (`[0]` = input).
    pub values: Vec<ValueInfo>,
}

fn fmt_err(path: &str, reason: impl Into<String>) -> RuntimeError {
    RuntimeError::Format { path: path.to_string(), reason: reason.into() }
}

impl DeployedModel {
    /// Validate a graph with its tensors.
    pub fn new(graph: Graph, tensors: Tensors) -> Result<Self, RuntimeError> {
        let values = graph.validate(&tensors)?;
        Ok(DeployedModel { graph, tensors, values })
    }

    /// Serialize to `.sbd` bytes.
    pub fn to_bytes(&self) -> Result<Vec<u8>, RuntimeError> {
        let owned: Vec<(String, Dtype, Vec<u8>, usize)> = self
            .tensors
            .iter()
            .map(|(name, d)| {
                let (dt, bytes): (Dtype, Vec<u8>) = match d {
                    TensorData::F32(v) => (Dtype::F32, v.iter().flat_map(|x| x.to_le_bytes()).collect()),
                    TensorData::U64(v) => (Dtype::U64, v.iter().flat_map(|x| x.to_le_bytes()).collect()),
                    TensorData::I32(v) => (Dtype::I32, v.iter().flat_map(|x| x.to_le_bytes()).collect()),
                    TensorData::U8(v) => (Dtype::U8, v.clone()),
                };
                (name.clone(), dt, bytes, d.len())
            })
            .collect();
        let views = owned
            .iter()
            .map(|(n, dt, b, len)| TensorView::new(*dt, vec![*len], b).map(|v| (n.clone(), v)))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| fmt_err("<memory>", e.to_string()))?;
        let graph = serde_json::to_string(&self.graph).map_err(|e| fmt_err("<memory>", e.to_string()))?;
        let meta = HashMap::from([
            ("format".to_string(), FORMAT_TAG.to_string()),
            ("version".to_string(), FORMAT_VERSION.to_string()),
            (CHECKSUM_KEY.to_string(), PLACEHOLDER.to_string()),
            ("graph".to_string(), graph),
        ]);
        let mut bytes = safetensors::serialize(views, Some(meta)).map_err(|e| fmt_err("<memory>", e.to_string()))?;
        if !reseal(&mut bytes) {
            return Err(fmt_err("<memory>", "serialized without its checksum key"));
        }
        Ok(bytes)
    }

    /// Write to `path` atomically (a temporary name, then a rename).
    pub fn save(&self, path: &Path) -> Result<(), RuntimeError> {
        let bytes = self.to_bytes()?;
        let tmp = path.with_extension("sbd.tmp");
        let io = |p: &Path, e| RuntimeError::Io { path: p.display().to_string(), cause: e };
        std::fs::write(&tmp, &bytes).map_err(|e| io(&tmp, e))?;
        std::fs::rename(&tmp, path).map_err(|e| io(path, e))
    }

    /// Read and validate a `.sbd` file.
    pub fn load(path: &Path) -> Result<Self, RuntimeError> {
        let bytes = std::fs::read(path).map_err(|e| RuntimeError::Io { path: path.display().to_string(), cause: e })?;
        Self::from_bytes(&bytes, &path.display().to_string())
    }

    /// Parse and validate `.sbd` bytes; `path` only names the source in errors.
    pub fn from_bytes(bytes: &[u8], path: &str) -> Result<Self, RuntimeError> {
        let (_, meta) = safetensors::SafeTensors::read_metadata(bytes).map_err(|e| {
            fmt_err(path, format!("not a safetensors container ({e}); export one with `sbdnet export`"))
        })?;
        let info = meta.metadata().clone().unwrap_or_default();
        if info.get("format").map(String::as_str) != Some(FORMAT_TAG) {
            return Err(fmt_err(
                path,
                format!("no `{FORMAT_TAG}` format tag (a training checkpoint? export it first)"),
            ));
        }
        let version = info.get("version").map(String::as_str).unwrap_or("?");
        if version != FORMAT_VERSION.to_string() {
            return Err(fmt_err(path, format!("format version {version}; this sbdnet reads version {FORMAT_VERSION}")));
        }
        if !verify(bytes, info.get(CHECKSUM_KEY).map(String::as_str)) {
            return Err(fmt_err(
                path,
                "the tensor data does not match its checksum (the file is corrupted); export the model again",
            ));
        }
        let graph_json = info.get("graph").ok_or_else(|| fmt_err(path, "no layer graph in the metadata"))?;
        let graph: Graph =
            serde_json::from_str(graph_json).map_err(|e| fmt_err(path, format!("layer graph is not valid: {e}")))?;
        let st = safetensors::SafeTensors::deserialize(bytes).map_err(|e| fmt_err(path, e.to_string()))?;
        let mut tensors = Tensors::new();
        for (name, view) in st.tensors() {
            let d = view.data();
            let data = match view.dtype() {
                Dtype::F32 => TensorData::F32(
                    d.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().expect("4 bytes"))).collect(),
                ),
                Dtype::U64 => TensorData::U64(
                    d.chunks_exact(8).map(|c| u64::from_le_bytes(c.try_into().expect("8 bytes"))).collect(),
                ),
                Dtype::I32 => TensorData::I32(
                    d.chunks_exact(4).map(|c| i32::from_le_bytes(c.try_into().expect("4 bytes"))).collect(),
                ),
                Dtype::U8 => TensorData::U8(d.to_vec()),
                other => return Err(fmt_err(path, format!("tensor {name} has unsupported dtype {other:?}"))),
            };
            tensors.insert(name, data);
        }
        Self::new(graph, tensors)
    }
}

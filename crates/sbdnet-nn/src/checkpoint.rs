//! Checkpoints: a directory with `model.safetensors` (parameters, running statistics,
//! optimizer state, and the training state as JSON metadata) and `config.json` (the model's
//! block list). Both are written to a temporary file and renamed, so an interrupted write
//! never replaces a good checkpoint with a broken one. The weights file's metadata holds a
//! checksum of its data section ([`sbdnet_kernels::checksum`]), checked when it is read, so
//! a corrupted file is refused rather than trained on.
//!
//! Tensor names: parameters and buffers by their layer names (`block1.pw.weight`,
//! `block1.pw_bn.running_mean`); optimizer state as `optim.m.<name>` / `optim.v.<name>`.

use crate::config::ModelConfig;
use crate::error::NnError;
use crate::model::Model;
use crate::optim::Optimizer;
use safetensors::tensor::{Dtype, TensorView};
use sbdnet_kernels::checksum::{seal, verify, PLACEHOLDER};
use std::collections::HashMap;
use std::path::Path;

/// File holding the tensors.
pub const WEIGHTS_FILE: &str = "model.safetensors";
/// File holding the model configuration.
pub const CONFIG_FILE: &str = "config.json";
/// Metadata key of the weights file's data checksum ([`sbdnet_kernels::checksum`]).
pub use sbdnet_kernels::checksum::KEY as CHECKSUM_KEY;
/// Format tag stored in the metadata.
pub const FORMAT: &str = "sbdnet-checkpoint-v1";

/// A checkpoint read from disk.
#[derive(Clone, Debug)]
pub struct Checkpoint {
    /// The model description.
    pub config: ModelConfig,
    /// Training state (epoch, RNG, arguments) as saved by the trainer, if any.
    pub state: Option<serde_json::Value>,
    /// The optimizer's step count, where optimizer state was saved.
    pub optim_t: Option<u64>,
    /// Every tensor, by name.
    pub tensors: HashMap<String, (Vec<usize>, Vec<f32>)>,
}

fn io_err(path: &Path, source: std::io::Error) -> NnError {
    NnError::Io { path: path.display().to_string(), cause: source }
}

fn bad(path: &Path, reason: impl Into<String>) -> NnError {
    NnError::Checkpoint { path: path.display().to_string(), reason: reason.into() }
}

/// Write `bytes` to `path` atomically (temporary file in the same directory, then rename).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), NnError> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, bytes).map_err(|e| io_err(&tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| io_err(path, e))
}

fn to_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// Save `model` (and `opt` if given) with the training `state` JSON into `dir`.
pub fn save(dir: &Path, model: &Model, opt: Option<&Optimizer>, state: &str) -> Result<(), NnError> {
    std::fs::create_dir_all(dir).map_err(|e| io_err(dir, e))?;
    let p = &model.params;
    let mut owned: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::new();
    for t in &p.tensors {
        owned.push((t.name.clone(), t.shape.clone(), to_bytes(&p.data[t.range()])));
        if let Some(o) = opt {
            owned.push((format!("optim.m.{}", t.name), t.shape.clone(), to_bytes(&o.m[t.range()])));
            if !o.v.is_empty() {
                owned.push((format!("optim.v.{}", t.name), t.shape.clone(), to_bytes(&o.v[t.range()])));
            }
        }
    }
    for t in &p.buffer_tensors {
        owned.push((t.name.clone(), t.shape.clone(), to_bytes(&p.buffers[t.range()])));
    }
    let views = owned
        .iter()
        .map(|(n, s, b)| TensorView::new(Dtype::F32, s.clone(), b).map(|v| (n.clone(), v)))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| bad(dir, e.to_string()))?;
    let mut meta = HashMap::new();
    meta.insert("format".to_string(), FORMAT.to_string());
    meta.insert("state".to_string(), state.to_string());
    if let Some(o) = opt {
        meta.insert("optim.t".to_string(), o.t.to_string());
    }
    // Sealed after serializing (checked by `Checkpoint::read`).
    meta.insert(CHECKSUM_KEY.to_string(), PLACEHOLDER.to_string());
    let mut bytes = safetensors::serialize(views, Some(meta)).map_err(|e| bad(dir, e.to_string()))?;
    if !seal(&mut bytes) {
        return Err(bad(dir, "serialized without its checksum key"));
    }
    let cfg = serde_json::to_vec_pretty(&model.config).map_err(|e| bad(dir, e.to_string()))?;
    write_atomic(&dir.join(CONFIG_FILE), &cfg)?;
    write_atomic(&dir.join(WEIGHTS_FILE), &bytes)
}

impl Checkpoint {
    /// Read a checkpoint directory, validating its structure.
    pub fn read(dir: &Path) -> Result<Self, NnError> {
        let cfg_path = dir.join(CONFIG_FILE);
        if !dir.is_dir() {
            return Err(bad(dir, "no such directory (train a model with `sbdnet train --out DIR` first)"));
        }
        if !cfg_path.exists() {
            return Err(bad(
                dir,
                format!("no {CONFIG_FILE} here: not a training run directory (`sbdnet train --out DIR` writes one)"),
            ));
        }
        let cfg_bytes = std::fs::read(&cfg_path).map_err(|e| io_err(&cfg_path, e))?;
        let config: ModelConfig =
            serde_json::from_slice(&cfg_bytes).map_err(|e| bad(&cfg_path, format!("invalid JSON: {e}")))?;
        let wpath = dir.join(WEIGHTS_FILE);
        let bytes = std::fs::read(&wpath).map_err(|e| io_err(&wpath, e))?;
        let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes)
            .map_err(|e| bad(&wpath, format!("not a safetensors file: {e}")))?;
        let info = meta.metadata().clone().unwrap_or_default();
        if info.get("format").map(String::as_str) != Some(FORMAT) {
            return Err(bad(&wpath, format!("missing format tag {FORMAT}")));
        }
        // Checkpoints written before the checksum existed have none and load unchecked.
        if !verify(&bytes, info.get(CHECKSUM_KEY).map(String::as_str)) {
            return Err(bad(
                &wpath,
                "the tensor data does not match its checksum (the file is corrupted); train again or restore a copy",
            ));
        }
        let st = safetensors::SafeTensors::deserialize(&bytes).map_err(|e| bad(&wpath, e.to_string()))?;
        let mut tensors = HashMap::new();
        for (name, view) in st.tensors() {
            if view.dtype() != Dtype::F32 {
                return Err(bad(&wpath, format!("tensor {name} is {:?}, expected F32", view.dtype())));
            }
            let data = view.data().chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
            tensors.insert(name, (view.shape().to_vec(), data));
        }
        // Both are metadata, outside the data checksum: refuse what does not parse instead of
        // carrying it along.
        let state = match info.get("state").filter(|s| !s.is_empty()) {
            Some(s) => serde_json::from_str::<serde_json::Value>(s)
                .map_err(|e| bad(&wpath, format!("its training state metadata is not valid JSON ({e})")))?,
            None => serde_json::Value::Null,
        };
        let optim_t = match info.get("optim.t") {
            Some(t) => Some(
                t.parse::<u64>().map_err(|_| bad(&wpath, format!("its optimizer step count {t:?} is not a number")))?,
            ),
            None => None,
        };
        Ok(Checkpoint { config, state: (!state.is_null()).then_some(state), optim_t, tensors })
    }

    /// The trainer's state JSON as saved.
    pub fn train_state(&self) -> Option<serde_json::Value> {
        self.state.clone()
    }

    /// Initialize `model` from this checkpoint's parameters and buffers where names and shapes
    /// agree (e.g. a binary-activation model from a trained float or binary-weight one: the
    /// thresholds it adds keep their initial values). Returns how many of the model's tensors
    /// were copied and the names of those that were not; optimizer state is not read.
    pub fn apply_matching(&self, model: &mut Model) -> (usize, Vec<String>) {
        let p = &mut model.params;
        let (mut copied, mut skipped) = (0, Vec::new());
        let mut copy = |t: &crate::params::TensorInfo, dst: &mut [f32]| match self.tensors.get(&t.name) {
            Some((s, d)) if *s == t.shape => {
                dst[t.range()].copy_from_slice(d);
                copied += 1;
            }
            _ => skipped.push(t.name.clone()),
        };
        for t in &p.tensors {
            copy(t, &mut p.data);
        }
        for t in &p.buffer_tensors {
            copy(t, &mut p.buffers);
        }
        (copied, skipped)
    }

    /// Copy the tensors into `model` (and `opt` if given), checking names and shapes.
    pub fn apply(&self, model: &mut Model, opt: Option<&mut Optimizer>, path: &Path) -> Result<(), NnError> {
        let get = |name: &str, shape: &[usize]| -> Result<&Vec<f32>, NnError> {
            let (s, d) = self.tensors.get(name).ok_or_else(|| bad(path, format!("tensor {name} is missing")))?;
            if s != shape {
                return Err(bad(path, format!("tensor {name} has shape {s:?}, the model needs {shape:?}")));
            }
            Ok(d)
        };
        let p = &mut model.params;
        for t in &p.tensors {
            let d = get(&t.name, &t.shape)?;
            p.data[t.range()].copy_from_slice(d);
        }
        for t in &p.buffer_tensors {
            let d = get(&t.name, &t.shape)?;
            p.buffers[t.range()].copy_from_slice(d);
        }
        if let Some(o) = opt {
            for t in &p.tensors {
                o.m[t.range()].copy_from_slice(get(&format!("optim.m.{}", t.name), &t.shape)?);
                if !o.v.is_empty() {
                    o.v[t.range()].copy_from_slice(get(&format!("optim.v.{}", t.name), &t.shape)?);
                }
            }
            o.t = self.optim_t.ok_or_else(|| bad(path, "no optimizer state saved"))?;
        }
        model.sync_sparse().map_err(|e| bad(path, e.to_string()))
    }
}

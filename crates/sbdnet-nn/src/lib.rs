//! Layers with explicit forward and backward, losses, optimizers, schedules, models and
//! checkpoints for sbdnet.
//!
//! A network is described by a [`ModelConfig`]: input shape, classes and a *block list*
//! (`Block::Conv`, `Block::DwSep`, `Block::Linear`, ...), so a new configuration is data, not
//! code. [`Model::new`] expands the blocks into a graph of [`Node`]s (each one layer, reading
//! earlier activations) and plans memory once per batch capacity: all parameters in one
//! buffer, all gradients in one buffer, all activations and their gradients in one buffer
//! each (shapes written in [`Node`]). A training step allocates nothing.
//!
//! Activations are NHWC. Backward passes *add* into input gradients, so fan-out (residual
//! connections) needs no special case; gradients are zeroed with one fill per step.
//!
//! ```
//! use sbdnet_nn::{Model, ModelConfig, Optimizer, OptimizerConfig, Loss};
//! let cfg = ModelConfig::preset("dscnn", [8, 8, 1], 10).unwrap();
//! let mut model = Model::new(cfg, 4, 0).unwrap();
//! let mut opt = Optimizer::new(OptimizerConfig::default(), model.params.len());
//! let x = vec![0.5f32; 4 * 64];
//! let y = [1u8, 2, 3, 4];
//! let stats = model.train_step(&x, &y, &Loss::default()).unwrap();
//! opt.step(&mut model.params, 0.01);
//! assert!(stats.loss.is_finite());
//! ```
#![deny(missing_docs)]

pub mod checkpoint;
pub mod config;
pub mod error;
pub mod group;
pub mod layers;
pub mod loss;
pub mod model;
pub mod optim;
pub mod params;
pub mod quant;
pub mod sparse;
pub mod summary;
pub mod transformer;

pub use config::{Act, Block, ModelConfig};
pub use error::NnError;
pub use loss::Loss;
pub use model::{GroupInfo, Model, Node, Shape, StepStats};
pub use optim::{Optimizer, OptimizerConfig, OptimizerKind, Schedule, ScheduleKind};
pub use params::ParamStore;
pub use quant::{Precision, QuantConfig};
pub use sparse::{SparseInfo, SparseKind, SparseSpec};

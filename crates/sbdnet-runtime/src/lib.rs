//! Deployment runtime for sbdnet models: no training code, no autograd.
//!
//! - [`graph`]: the deployed layer graph (BatchNorm, `alpha` and binarization thresholds
//!   folded at export) and its validation.
//! - [`format`](mod@format): the versioned `.sbd` file (a safetensors container: graph JSON in the
//!   metadata, packed sign bits, group masks, integer thresholds, per-channel affines) and
//!   its hardened loader.
//! - [`reference`](mod@reference): a plain `f32` executor for every layer kind, the oracle.
//! - [`plan`]: plan once (choose a kernel per layer, pack, size buffers), run many times
//!   without allocating: XOR + popcount for binary layers on binary inputs, bit-sliced
//!   depthwise, add/subtract-only kernels for binary weights on 8-bit activations.
#![deny(missing_docs)]

mod conv_sign;
pub mod error;
pub mod format;
pub mod graph;
pub mod int8;
pub mod plan;
pub mod reference;

pub use error::RuntimeError;
pub use format::DeployedModel;
pub use graph::Graph;
pub use plan::{A8Mode, Plan, PlanOptions};

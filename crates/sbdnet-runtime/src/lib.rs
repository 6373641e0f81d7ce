//! Deployment runtime for sbdnet models.
//!
//! This crate will hold the multiplication-free inference engine: loading an exported
//! model, planning it once (packing weights into bits, folding BatchNorm, choosing kernels)
//! and running it without allocation. It is filled by the runtime issue; for now it only
//! re-exports the training-side model so the dependency direction
//! (kernels <- nn <- runtime <- cli) is in place.
#![deny(missing_docs)]

pub use sbdnet_nn::Model;

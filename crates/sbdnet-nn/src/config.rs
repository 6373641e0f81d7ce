//! Model descriptions as data: a block list, serializable to JSON.

use crate::error::NnError;
use serde::{Deserialize, Serialize};

/// Activation after a block.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Act {
    /// No activation.
    None,
    /// `max(x, 0)`.
    #[default]
    Relu,
    /// `clamp(x, -1, 1)`.
    Hardtanh,
}

/// One entry of a block list.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Block {
    /// Ordinary `k x k` convolution (no bias), BatchNorm, activation.
    Conv {
        /// Output channels.
        out: usize,
        /// Kernel size.
        kernel: usize,
        /// Stride.
        stride: usize,
        /// Activation.
        act: Act,
    },
    /// Depthwise-separable block: depthwise `k x k` + BN + act, pointwise 1x1 + BN + act.
    DwSep {
        /// Output channels of the pointwise convolution.
        out: usize,
        /// Depthwise kernel size.
        kernel: usize,
        /// Depthwise stride.
        stride: usize,
        /// Activation.
        act: Act,
    },
    /// Max pooling.
    MaxPool {
        /// Window.
        k: usize,
        /// Stride.
        stride: usize,
    },
    /// Average pooling.
    AvgPool {
        /// Window.
        k: usize,
        /// Stride.
        stride: usize,
    },
    /// Global average pooling to `1 x 1 x C`.
    GlobalAvgPool,
    /// Flatten to `1 x 1 x (H*W*C)` (NHWC order).
    Flatten,
    /// Dropout with drop probability `p` (training only).
    Dropout {
        /// Drop probability.
        p: f32,
    },
    /// Fully connected layer on the flattened input.
    Linear {
        /// Output features.
        out: usize,
        /// Whether it has a bias.
        bias: bool,
    },
    /// Residual: `y = body(x) + shortcut(x)`, then the activation. The shortcut is the
    /// identity when shapes agree, else a strided 1x1 convolution + BN.
    Residual {
        /// The blocks of the residual branch.
        body: Vec<Block>,
        /// Activation after the addition.
        act: Act,
    },
}

/// A whole network: input shape, class count and block list. The classifier is the last
/// block (a `Linear` with `out == classes`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ModelConfig {
    /// Preset name or a user name.
    pub name: String,
    /// Input `[height, width, channels]`.
    pub input: [usize; 3],
    /// Number of classes.
    pub classes: usize,
    /// The blocks, in order.
    pub blocks: Vec<Block>,
}

/// Names of the built-in models.
pub const PRESETS: &[&str] = &["dscnn", "cnn"];

impl ModelConfig {
    /// A built-in model for inputs of `input = [h, w, c]` and `classes` classes.
    ///
    /// - `dscnn`: conv3x3 (->32) + BN + ReLU, depthwise-separable blocks (32->64, s1),
    ///   (64->128, s2), (128->128, s1), (128->256, s2), global average pool, linear.
    /// - `cnn`: the same with an ordinary 3x3 convolution in place of each depthwise-separable
    ///   block (the full-precision baseline).
    pub fn preset(name: &str, input: [usize; 3], classes: usize) -> Result<Self, NnError> {
        let stages = [(64, 1), (128, 2), (128, 1), (256, 2)];
        let conv = |out, stride| Block::Conv { out, kernel: 3, stride, act: Act::Relu };
        let mut blocks = vec![conv(32, 1)];
        match name {
            "dscnn" => blocks.extend(stages.iter().map(|&(out, stride)| Block::DwSep {
                out,
                kernel: 3,
                stride,
                act: Act::Relu,
            })),
            "cnn" => blocks.extend(stages.iter().map(|&(out, stride)| conv(out, stride))),
            _ => return Err(NnError::UnknownModel { name: name.to_string(), choices: PRESETS.join(", ") }),
        }
        blocks.push(Block::GlobalAvgPool);
        blocks.push(Block::Linear { out: classes, bias: true });
        Ok(ModelConfig { name: name.to_string(), input, classes, blocks })
    }
}

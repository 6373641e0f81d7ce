//! Model descriptions as data: a block list, serializable to JSON.

use crate::error::NnError;
use crate::quant::{Precision, QuantConfig};
use crate::sparse::SparseSpec;
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

fn no_act() -> Act {
    Act::None
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
    /// Fully connected layer on the flattened input, optionally sparse (DynaDiag, SET, RigL:
    /// see [`crate::sparse`]) and followed by an activation.
    Linear {
        /// Output features.
        out: usize,
        /// Whether it has a bias.
        bias: bool,
        /// Activation after the layer (none when absent from a saved configuration).
        #[serde(default = "no_act")]
        act: Act,
        /// Sparse layer kind and knobs; dense when absent.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        sparse: Option<SparseSpec>,
    },
    /// Patch embedding (vision transformer): non-overlapping `patch x patch` patches, each
    /// projected to `dim` features (dense, with bias), plus a learned position embedding; the
    /// output is the token grid `(h / patch, w / patch, dim)`.
    PatchEmbed {
        /// Patch side (must divide the input's height and width).
        patch: usize,
        /// Token width.
        dim: usize,
    },
    /// Pre-LayerNorm transformer encoder block on a token grid of width `dim`:
    /// `x += proj(attention(qkv(ln1(x))))`, then `x += fc2(gelu(fc1(ln2(x))))`, with
    /// multi-head self-attention over all tokens of an image and GELU in its tanh form. The
    /// four token-wise linear layers (qkv `dim -> 3 dim`, proj `dim -> dim`, fc1
    /// `dim -> mlp_ratio dim`, fc2 back) have biases and follow `sparse`.
    Transformer {
        /// Attention heads (must divide the width).
        heads: usize,
        /// Hidden width of the MLP as a multiple of the token width.
        mlp_ratio: f32,
        /// Sparse kind of the four linear layers; dense when absent.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        sparse: Option<SparseSpec>,
    },
    /// MLP-Mixer block (Tolstikhin et al., 2021) on a token grid of width `dim` with `T`
    /// tokens: `x += transpose(fc2(gelu(fc1(transpose(ln1(x))))))` (token mixing: linear
    /// layers across the `T` tokens, shared by all channels, hidden width
    /// `token_ratio * T`), then `x += fc2(gelu(fc1(ln2(x))))` (channel mixing, hidden
    /// `channel_ratio * dim`). The four linear layers have biases and follow `sparse`.
    Mixer {
        /// Hidden width of the token-mixing MLP as a multiple of the token count.
        token_ratio: f32,
        /// Hidden width of the channel-mixing MLP as a multiple of the token width.
        channel_ratio: f32,
        /// Sparse kind of the four linear layers; dense when absent.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        sparse: Option<SparseSpec>,
    },
    /// Layer normalization over the channels of every position (token), with scale and shift.
    LayerNorm,
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
    /// Binarization of the layers (float by default).
    #[serde(default)]
    pub quant: QuantConfig,
}

/// Names of the built-in models.
pub const PRESETS: &[&str] =
    &["dscnn", "cnn", "bdnet", "mobilenet", "resnet20-ds", "mlp", "mlp-wide", "vit-tiny", "mixer-tiny"];

impl ModelConfig {
    /// A built-in model, full precision, width 1 (see [`ModelConfig::build`]).
    pub fn preset(name: &str, input: [usize; 3], classes: usize) -> Result<Self, NnError> {
        Self::build(name, input, classes, 1.0, QuantConfig::default())
    }

    /// A built-in model for inputs `input = [h, w, c]`, `classes` classes, every channel
    /// count multiplied by `width` (at least 1), quantized as `quant` says.
    ///
    /// - `dscnn`: conv3x3 (->32) + BN + ReLU, depthwise-separable blocks (32->64, s1),
    ///   (64->128, s2), (128->128, s1), (128->256, s2), global average pool, linear.
    /// - `cnn`: the same with an ordinary 3x3 convolution in place of each depthwise-separable
    ///   block (the full-precision baseline).
    /// - `bdnet`: `dscnn` with binary weights (its precision is at least `w1`).
    /// - `mobilenet`: MobileNet-V1 widths for 32x32 inputs: conv3x3 (->32, stride 1), then
    ///   depthwise-separable blocks to 64, 128/2, 128, 256/2, 256, 512/2, 512 x5, 1024/2, 1024.
    /// - `resnet20-ds`: ResNet-20 for 32x32 inputs (conv3x3 ->16, three stages of three basic
    ///   blocks at 16, 32/2, 64/2 channels) with every 3x3 convolution of a basic block replaced
    ///   by a depthwise-separable block; projection shortcuts (1x1 conv + BN) where the shape
    ///   changes.
    /// - `mlp`: flatten, linear 256 + ReLU, linear 256 + ReLU, linear classifier (784-256-256-10
    ///   on 28x28 images); `mlp-wide`: the same with 1024 hidden units. Their hidden layers
    ///   become sparse with [`ModelConfig::with_hidden_linear`]; the classifier stays dense.
    ///
    /// - `vit-tiny`: a vision transformer: patch embedding (patch 7 when it divides the input
    ///   size, as on 28x28 images: 16 tokens; else 4), width 192 (3 heads of 64; `width`
    ///   scales the head width), 6 pre-LayerNorm encoder blocks with MLP ratio 4, a final
    ///   LayerNorm, mean pooling over the tokens (no class token) and a linear classifier
    ///   (see [`ModelConfig::vit`]). Float only.
    /// - `mixer-tiny`: an MLP-Mixer with the same patch embedding and width (192), 6 Mixer
    ///   blocks with token-mixing hidden width 4 x tokens and channel-mixing hidden width
    ///   4 x 192, a final LayerNorm, mean pooling and a linear classifier (see
    ///   [`ModelConfig::mixer`]). Float only.
    ///
    /// With binary activations (`w1a1`) the blocks' activation is Hardtanh (the binarizer that
    /// follows is the nonlinearity; Hardtanh keeps the sign information ReLU would drop).
    pub fn build(
        name: &str,
        input: [usize; 3],
        classes: usize,
        width: f32,
        quant: QuantConfig,
    ) -> Result<Self, NnError> {
        if !(width > 0.0 && width <= 16.0) {
            return Err(NnError::Config(format!("width must be in (0, 16], got {width}")));
        }
        let ch = |c: usize| ((c as f32 * width).round() as usize).max(1);
        let mut quant = quant;
        if name == "bdnet" && quant.precision == Precision::Float {
            quant.precision = Precision::W1;
        }
        let act = if quant.precision.binary_acts() { Act::Hardtanh } else { Act::Relu };
        if let Some(hidden) = match name {
            "mlp" => Some(256),
            "mlp-wide" => Some(1024),
            _ => None,
        } {
            // Linear layers count as first / last layers: at a binary precision nothing would
            // be binarized (and no group pruned) without the flag, yet the run would carry the
            // precision's name.
            if quant.precision != Precision::Float && (!quant.binarize_first_last || quant.precision.sparse()) {
                return Err(NnError::Config(format!(
                    "{name} has only linear layers, which stay float at precision {} like every \
                     model's first and last layers; use --precision float, or w1 / w1a1 with \
                     --binarize-first-last to binarize them (sw1 / sw1a1 prune convolutions only)",
                    quant.precision.name()
                )));
            }
            let fc = |out, act| Block::Linear { out, bias: true, act, sparse: None };
            let blocks = vec![Block::Flatten, fc(ch(hidden), act), fc(ch(hidden), act), fc(classes, Act::None)];
            return Ok(ModelConfig { name: name.to_string(), input, classes, blocks, quant });
        }
        if name == "vit-tiny" || name == "mixer-tiny" {
            if quant.precision != Precision::Float {
                return Err(NnError::Config(format!(
                    "{name} is float only (got precision {})",
                    quant.precision.name()
                )));
            }
            let patch = [7, 4]
                .into_iter()
                .find(|&p| input[0].is_multiple_of(p) && input[1].is_multiple_of(p))
                .ok_or_else(|| {
                    NnError::Config(format!("{name}: input {}x{} is divisible by neither 7 nor 4", input[0], input[1]))
                })?;
            let mut cfg = if name == "vit-tiny" {
                Self::vit(input, classes, patch, 3 * ch(64), 6, 3, 4.0)
            } else {
                Self::mixer(input, classes, patch, 3 * ch(64), 6, 4.0, 4.0)
            };
            cfg.name = name.to_string();
            return Ok(cfg);
        }
        let conv = |out, stride| Block::Conv { out: ch(out), kernel: 3, stride, act: Act::Relu };
        let ds = |out, stride| Block::DwSep { out: ch(out), kernel: 3, stride, act };
        let mut blocks = vec![conv(if name == "resnet20-ds" { 16 } else { 32 }, 1)];
        match name {
            "dscnn" | "bdnet" => blocks.extend([(64, 1), (128, 2), (128, 1), (256, 2)].map(|(o, s)| ds(o, s))),
            "cnn" => blocks.extend([(64, 1), (128, 2), (128, 1), (256, 2)].map(|(o, s)| Block::Conv {
                out: ch(o),
                kernel: 3,
                stride: s,
                act,
            })),
            "mobilenet" => {
                let stages = [
                    (64, 1),
                    (128, 2),
                    (128, 1),
                    (256, 2),
                    (256, 1),
                    (512, 2),
                    (512, 1),
                    (512, 1),
                    (512, 1),
                    (512, 1),
                    (512, 1),
                    (1024, 2),
                    (1024, 1),
                ];
                blocks.extend(stages.map(|(o, s)| ds(o, s)));
            }
            "resnet20-ds" => {
                for (stage, out) in [16, 32, 64].into_iter().enumerate() {
                    for i in 0..3 {
                        let stride = if stage > 0 && i == 0 { 2 } else { 1 };
                        let last = Block::DwSep { out: ch(out), kernel: 3, stride: 1, act: Act::None };
                        blocks.push(Block::Residual { body: vec![ds(out, stride), last], act });
                    }
                }
            }
            _ => {
                return Err(NnError::UnknownModel { name: name.to_string(), choices: PRESETS.join(", ") });
            }
        }
        blocks.push(Block::GlobalAvgPool);
        blocks.push(Block::Linear { out: classes, bias: true, act: Act::None, sparse: None });
        Ok(ModelConfig { name: name.to_string(), input, classes, blocks, quant })
    }

    /// A vision transformer named `vit`: patch embedding (`patch`, width `dim`), `depth`
    /// pre-LayerNorm encoder blocks with `heads` heads and MLP ratio `mlp_ratio`, a final
    /// LayerNorm, mean pooling over the tokens and a dense linear classifier.
    pub fn vit(
        input: [usize; 3],
        classes: usize,
        patch: usize,
        dim: usize,
        depth: usize,
        heads: usize,
        mlp_ratio: f32,
    ) -> Self {
        let body = (0..depth).map(|_| Block::Transformer { heads, mlp_ratio, sparse: None });
        Self::token_model("vit", input, classes, patch, dim, body)
    }

    /// An MLP-Mixer named `mixer`: patch embedding (`patch`, width `dim`), `depth` Mixer
    /// blocks, a final LayerNorm, mean pooling over the tokens and a dense linear classifier.
    pub fn mixer(
        input: [usize; 3],
        classes: usize,
        patch: usize,
        dim: usize,
        depth: usize,
        token_ratio: f32,
        channel_ratio: f32,
    ) -> Self {
        let body = (0..depth).map(|_| Block::Mixer { token_ratio, channel_ratio, sparse: None });
        Self::token_model("mixer", input, classes, patch, dim, body)
    }

    /// Patch embedding, `body`, a final LayerNorm, mean pooling over the tokens and a dense
    /// linear classifier.
    fn token_model(
        name: &str,
        input: [usize; 3],
        classes: usize,
        patch: usize,
        dim: usize,
        body: impl Iterator<Item = Block>,
    ) -> Self {
        let mut blocks = vec![Block::PatchEmbed { patch, dim }];
        blocks.extend(body);
        blocks.extend([
            Block::LayerNorm,
            Block::GlobalAvgPool,
            Block::Linear { out: classes, bias: true, act: Act::None, sparse: None },
        ]);
        ModelConfig { name: name.into(), input, classes, blocks, quant: QuantConfig::default() }
    }

    /// Make every `Linear` block but the last one (the classifier, which stays dense) follow
    /// `spec` (`None`: dense), including those inside residual bodies, and so the linear
    /// layers of every `Transformer` block.
    pub fn with_hidden_linear(mut self, spec: Option<SparseSpec>) -> Self {
        fn visit<'a>(blocks: &'a mut [Block], out: &mut Vec<&'a mut Option<SparseSpec>>) {
            for b in blocks {
                match b {
                    Block::Linear { sparse, .. } | Block::Transformer { sparse, .. } | Block::Mixer { sparse, .. } => {
                        out.push(sparse)
                    }
                    Block::Residual { body, .. } => visit(body, out),
                    _ => {}
                }
            }
        }
        let mut slots = Vec::new();
        visit(&mut self.blocks, &mut slots);
        slots.pop();
        for s in slots {
            *s = spec;
        }
        self
    }

    /// Whether any layer is sparse.
    pub fn has_sparse(&self) -> bool {
        fn any(blocks: &[Block]) -> bool {
            blocks.iter().any(|b| match b {
                Block::Linear { sparse, .. } | Block::Transformer { sparse, .. } | Block::Mixer { sparse, .. } => {
                    sparse.is_some()
                }
                Block::Residual { body, .. } => any(body),
                _ => false,
            })
        }
        any(&self.blocks)
    }

    /// The input size a preset is designed for, if it has one (`mobilenet` and `resnet20-ds`
    /// expect 32x32: smaller images are zero-padded to it).
    pub fn preferred_input_size(name: &str) -> Option<usize> {
        matches!(name, "mobilenet" | "resnet20-ds").then_some(32)
    }
}

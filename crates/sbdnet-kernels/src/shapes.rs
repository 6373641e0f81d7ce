//! The layer shapes of the reference models at batch 1, for benchmarks of every kernel
//! family (binary, W1-A8): dscnn on 28x28 inputs and mobilenet on 32x32x3 inputs (first
//! convolution stride 1). One list, so the benchmark groups of different crates time the
//! same layers.

/// `(model, input side, cin, cout)` of the pointwise layers.
pub const POINTWISE: &[(&str, usize, usize, usize)] = &[
    ("dscnn", 28, 32, 64),
    ("dscnn", 14, 64, 128),
    ("dscnn", 14, 128, 128),
    ("dscnn", 7, 128, 256),
    ("mobilenet", 32, 32, 64),
    ("mobilenet", 16, 128, 128),
    ("mobilenet", 8, 256, 256),
    ("mobilenet", 4, 512, 512),
    ("mobilenet", 2, 1024, 1024),
];

/// `(model, input side, channels, stride)` of the depthwise 3x3 layers (padding 1).
pub const DEPTHWISE: &[(&str, usize, usize, usize)] = &[
    ("dscnn", 28, 32, 1),
    ("dscnn", 28, 64, 2),
    ("dscnn", 14, 128, 1),
    ("dscnn", 14, 128, 2),
    ("mobilenet", 32, 32, 1),
    ("mobilenet", 16, 128, 1),
    ("mobilenet", 8, 256, 1),
    ("mobilenet", 4, 512, 1),
];

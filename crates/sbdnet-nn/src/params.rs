//! One flat buffer for all parameters, one for their gradients, one for non-trained state.

/// A named tensor inside a flat buffer.
#[derive(Clone, Debug)]
pub struct TensorInfo {
    /// Name, e.g. `block1.pw.weight`.
    pub name: String,
    /// First element in the flat buffer.
    pub offset: usize,
    /// Shape (its product is the length).
    pub shape: Vec<usize>,
    /// Whether weight decay applies (conv and linear weights; not biases, not BatchNorm).
    pub decay: bool,
}

impl TensorInfo {
    /// Element count.
    pub fn len(&self) -> usize {
        self.shape.iter().product()
    }
    /// True for an empty tensor.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Range in the flat buffer.
    pub fn range(&self) -> std::ops::Range<usize> {
        self.offset..self.offset + self.len()
    }
}

/// Identifies a tensor of a [`ParamStore`]: its range.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ParamId {
    /// Offset.
    pub offset: usize,
    /// Length.
    pub len: usize,
}

impl ParamId {
    /// Range in the flat buffer.
    pub fn range(&self) -> std::ops::Range<usize> {
        self.offset..self.offset + self.len
    }
}

/// All trainable parameters (`data`), their gradients (`grad`) and non-trained state such as
/// BatchNorm running statistics (`buffers`), each one allocation.
#[derive(Clone, Debug, Default)]
pub struct ParamStore {
    /// Parameter values.
    pub data: Vec<f32>,
    /// Gradients (same layout as `data`).
    pub grad: Vec<f32>,
    /// Parameter tensors.
    pub tensors: Vec<TensorInfo>,
    /// Non-trained state values.
    pub buffers: Vec<f32>,
    /// Non-trained state tensors.
    pub buffer_tensors: Vec<TensorInfo>,
}

impl ParamStore {
    /// Register a parameter tensor filled by `init`.
    pub fn add(&mut self, name: String, shape: Vec<usize>, decay: bool, init: impl FnMut() -> f32) -> ParamId {
        let offset = self.data.len();
        let len: usize = shape.iter().product();
        self.data.extend(std::iter::repeat_with(init).take(len));
        self.grad.resize(self.data.len(), 0.0);
        self.tensors.push(TensorInfo { name, offset, shape, decay });
        ParamId { offset, len }
    }

    /// Register a non-trained state tensor filled with `value`.
    pub fn add_buffer(&mut self, name: String, shape: Vec<usize>, value: f32) -> ParamId {
        let offset = self.buffers.len();
        let len: usize = shape.iter().product();
        self.buffers.resize(offset + len, value);
        self.buffer_tensors.push(TensorInfo { name, offset, shape, decay: false });
        ParamId { offset, len }
    }

    /// Number of parameters.
    pub fn len(&self) -> usize {
        self.data.len()
    }

    /// True when there are no parameters.
    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }

    /// Parameter tensor by name.
    pub fn get(&self, name: &str) -> Option<&[f32]> {
        self.tensors.iter().find(|t| t.name == name).map(|t| &self.data[t.range()])
    }

    /// Parameter or non-trained state (buffer) tensor by name.
    pub fn find(&self, name: &str) -> Option<&[f32]> {
        self.get(name).or_else(|| self.buffer_tensors.iter().find(|t| t.name == name).map(|t| &self.buffers[t.range()]))
    }

    /// Zero all gradients (one fill).
    pub fn zero_grad(&mut self) {
        self.grad.fill(0.0);
    }
}

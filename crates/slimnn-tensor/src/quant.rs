/// Affine quantization parameters: `real = scale * (q - zero_point)`.
///
/// Per-tensor when `axis` is `None` (one scale and zero point), per-channel along `axis`
/// otherwise (one per index of that axis).
#[derive(Debug, Clone, PartialEq)]
pub struct QuantParams {
    pub scale: Vec<f32>,
    pub zero_point: Vec<i32>,
    pub axis: Option<usize>,
}

impl QuantParams {
    pub fn per_tensor(scale: f32, zero_point: i32) -> Self {
        QuantParams { scale: vec![scale], zero_point: vec![zero_point], axis: None }
    }

    pub fn per_channel(scale: Vec<f32>, zero_point: Vec<i32>, axis: usize) -> Self {
        QuantParams { scale, zero_point, axis: Some(axis) }
    }

    /// Scale and zero point for channel `c` (ignored when per-tensor).
    pub fn params_for(&self, c: usize) -> (f32, i32) {
        match self.axis {
            None => (self.scale[0], self.zero_point[0]),
            Some(_) => (self.scale[c], self.zero_point[c]),
        }
    }
}

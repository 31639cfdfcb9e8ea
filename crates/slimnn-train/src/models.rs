//! Trainable model builders: LeNet-5 and LeNet-300-100 for 28x28 images, and a BERT-family
//! sentence classifier (mean-pooled encoder + linear head) with an optional shallower student
//! taken from every other teacher layer.
//!
//! A [`Model`]'s parameters are `Input` nodes of its graph, with their values alongside, so the
//! same graph serves training (values fed each step) and, after [`freeze`], inference and export.

use crate::{lift_parameters, Parameters, Result};
use slimnn_ir::ops::{Conv, ConvAttrs, Flatten, Gemm, Pool, PoolAttrs, PoolKind, Unary, UnaryOp};
use slimnn_ir::{Fact, Graph, IrError, IrResult, OutletId};
use slimnn_tensor::{DType, Dim, Tensor};
use std::path::Path;

/// A graph whose parameters are inputs, the parameters' initial values, and what it computes.
#[derive(Debug, Clone)]
pub struct Model {
    pub graph: Graph,
    pub params: Parameters,
    /// The data inputs (everything that is not a parameter), in graph input order.
    pub data_inputs: Vec<String>,
    /// The output holding the class logits `[batch, classes]`.
    pub logits: OutletId,
}

/// Which image classifier to build.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ImageArch {
    /// conv 6@5x5 (pad 2) - max-pool - conv 16@5x5 - max-pool - fc 120 - fc 84 - fc 10, ReLU.
    Lenet5,
    /// fc 300 - fc 100 - fc 10 on the flattened image, ReLU.
    Lenet300100,
}

/// SplitMix64: a small, seedable generator for weight initialisation.
struct SplitMix(u64);

impl SplitMix {
    fn next_f64(&mut self) -> f64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        ((z ^ (z >> 31)) >> 11) as f64 / (1u64 << 53) as f64
    }
    /// He (Kaiming) uniform for a ReLU layer: U(-sqrt(6 / fan_in), sqrt(6 / fan_in)).
    fn he_uniform(&mut self, shape: Vec<usize>, fan_in: usize) -> IrResult<Tensor> {
        let bound = (6.0 / fan_in as f64).sqrt();
        let n = shape.iter().product();
        let v: Vec<f32> = (0..n).map(|_| ((self.next_f64() * 2.0 - 1.0) * bound) as f32).collect();
        Ok(Tensor::from_vec(shape, v)?)
    }
}

struct ImageBuilder {
    g: Graph,
    params: Parameters,
    rng: SplitMix,
}

impl ImageBuilder {
    fn param(&mut self, name: &str, t: Tensor) -> Result<OutletId> {
        let o = self.g.add_input(name, Fact::known(DType::F32, t.shape()))?;
        self.params.push(name, t)?;
        Ok(o)
    }
    fn relu(&mut self, name: &str, x: OutletId) -> IrResult<OutletId> {
        Ok(self.g.add_node(name, Unary(UnaryOp::Relu), vec![x])?[0])
    }
    /// `x @ W^T + b` with `W` stored `[out, in]` as PyTorch's Linear (Gemm transB, as exporters write it).
    fn linear(&mut self, name: &str, x: OutletId, inp: usize, out: usize) -> Result<OutletId> {
        let w = self.rng.he_uniform(vec![out, inp], inp)?;
        let w = self.param(&format!("{name}.weight"), w)?;
        let b = self.param(&format!("{name}.bias"), Tensor::zeros(DType::F32, vec![out])?)?;
        let gemm = Gemm { alpha: 1.0, beta: 1.0, trans_a: false, trans_b: true };
        Ok(self.g.add_node(&format!("/{name}/Gemm"), gemm, vec![x, w, b])?[0])
    }
    fn conv(&mut self, name: &str, x: OutletId, cin: usize, cout: usize, k: usize, pad: usize) -> Result<OutletId> {
        let w = self.rng.he_uniform(vec![cout, cin, k, k], cin * k * k)?;
        let w = self.param(&format!("{name}.weight"), w)?;
        let b = self.param(&format!("{name}.bias"), Tensor::zeros(DType::F32, vec![cout])?)?;
        let attrs = ConvAttrs {
            kernel_shape: Some(vec![k, k]),
            strides: vec![1, 1],
            pads: vec![pad; 4],
            dilations: vec![1, 1],
            group: 1,
            ..Default::default()
        };
        Ok(self.g.add_node(&format!("/{name}/Conv"), Conv { attrs }, vec![x, w, b])?[0])
    }
    fn max_pool(&mut self, name: &str, x: OutletId) -> IrResult<OutletId> {
        let attrs = PoolAttrs { kernel_shape: vec![2, 2], strides: vec![2, 2], ..Default::default() };
        Ok(self.g.add_node(name, Pool { kind: PoolKind::Max, attrs }, vec![x])?[0])
    }
}

/// Builds a freshly initialised image classifier on `[batch, 1, 28, 28]` f32 input `image`,
/// output `logits` `[batch, 10]`. Weights He-uniform from `seed`, biases zero.
pub fn image_classifier(arch: ImageArch, seed: u64) -> Result<Model> {
    let mut b = ImageBuilder { g: Graph::default(), params: Parameters::new(), rng: SplitMix(seed) };
    let image =
        b.g.add_input("image", Fact::new(DType::F32, vec![Dim::sym("batch"), 1.into(), 28.into(), 28.into()]))?;
    let flat = |b: &mut ImageBuilder, name: &str, x: OutletId| -> Result<OutletId> {
        Ok(b.g.add_node(name, Flatten { axis: 1 }, vec![x])?[0])
    };
    let logits = match arch {
        ImageArch::Lenet5 => {
            let x = b.conv("conv1", image, 1, 6, 5, 2)?;
            let x = b.relu("/conv1/Relu", x)?;
            let x = b.max_pool("/pool1/MaxPool", x)?;
            let x = b.conv("conv2", x, 6, 16, 5, 0)?;
            let x = b.relu("/conv2/Relu", x)?;
            let x = b.max_pool("/pool2/MaxPool", x)?;
            let x = flat(&mut b, "/Flatten", x)?;
            let x = b.linear("fc1", x, 400, 120)?;
            let x = b.relu("/fc1/Relu", x)?;
            let x = b.linear("fc2", x, 120, 84)?;
            let x = b.relu("/fc2/Relu", x)?;
            b.linear("fc3", x, 84, 10)?
        }
        ImageArch::Lenet300100 => {
            let x = flat(&mut b, "/Flatten", image)?;
            let x = b.linear("fc1", x, 784, 300)?;
            let x = b.relu("/fc1/Relu", x)?;
            let x = b.linear("fc2", x, 300, 100)?;
            let x = b.relu("/fc2/Relu", x)?;
            b.linear("fc3", x, 100, 10)?
        }
    };
    b.g.add_output("logits", logits);
    b.g.metadata.insert("architecture".into(), format!("{arch:?}"));
    Ok(Model { graph: b.g, params: b.params, data_inputs: vec!["image".into()], logits })
}

/// A BERT-family sentence classifier from a Hugging Face folder: the encoder's tokens are mean
/// pooled over the attention mask (as sentence-transformers does, before its L2 normalisation)
/// and a linear head maps the pooled vector to `classes` logits. `layers` picks the teacher layers
/// the encoder keeps (e.g. `[0, 2, 4]` for a 3-layer student); `None` keeps all. Every initializer
/// becomes a parameter; the head is initialised from `seed`.
pub fn text_classifier(dir: &Path, classes: usize, layers: Option<&[usize]>, seed: u64) -> Result<Model> {
    let encoder = slimnn_formats::hf::load_bert_layers(dir, layers)
        .map_err(|e| crate::TrainError::Invalid(format!("{}: {e}", dir.display())))?;
    let pooled = find_outlet(&encoder, "/pooling/Div")?;
    let hidden = encoder
        .fact(pooled)
        .shape
        .last()
        .and_then(|d| d.as_known())
        .ok_or_else(|| IrError::Graph("the encoder's pooled output has no known hidden size".into()))?;
    let mut encoder = encoder;
    encoder.set_outputs(vec![("pooled".into(), pooled)]);
    encoder.compact()?;
    let (mut g, mut params) = lift_parameters(&encoder, |_, t| t.len() > 1)?;
    let pooled = g.outputs()[0].1;
    let mut rng = SplitMix(seed);
    // A small head (uniform with BERT's 0.02 standard deviation) keeps the first logits near zero.
    let bound = 0.02 * 3f64.sqrt();
    let w: Vec<f32> = (0..classes * hidden).map(|_| ((rng.next_f64() * 2.0 - 1.0) * bound) as f32).collect();
    let w = Tensor::from_vec(vec![classes, hidden], w)?;
    let wo = g.add_input("classifier.weight", Fact::known(DType::F32, w.shape()))?;
    params.push("classifier.weight", w)?;
    let bo = g.add_input("classifier.bias", Fact::known(DType::F32, &[classes]))?;
    params.push("classifier.bias", Tensor::zeros(DType::F32, vec![classes])?)?;
    let gemm = Gemm { alpha: 1.0, beta: 1.0, trans_a: false, trans_b: true };
    let logits = g.add_node("/classifier/Gemm", gemm, vec![pooled, wo, bo])?[0];
    g.set_outputs(vec![("logits".into(), logits)]);
    let data_inputs =
        (0..g.inputs().len()).map(|i| g.input_name(i)).filter(|n| params.get(n).is_none()).map(String::from).collect();
    Ok(Model { graph: g, params, data_inputs, logits })
}

/// The outlet of the node named `name`'s first output.
pub fn find_outlet(g: &Graph, name: &str) -> IrResult<OutletId> {
    g.nodes()
        .iter()
        .position(|n| n.name == name)
        .map(|id| OutletId::new(id, 0))
        .ok_or_else(|| IrError::Graph(format!("the model has no node named '{name}'")))
}

use super::OpDef;
use crate::{Fact, IrError, IrResult};
use slimnn_tensor::Tensor;
use std::sync::Arc;

/// A graph input; its node name is the input's name and `fact` its declared type and shape.
#[derive(Debug, Clone, PartialEq)]
pub struct Input {
    pub fact: Fact,
}

impl OpDef for Input {
    fn name(&self) -> &'static str {
        "Input"
    }
    fn output_facts(&self, inputs: &[&Fact]) -> IrResult<Vec<Fact>> {
        super::util::expect_inputs("Input", inputs, 0, 0)?;
        Ok(vec![self.fact.without_value()])
    }
    fn eval(&self, _inputs: &[&Tensor]) -> IrResult<Vec<Tensor>> {
        Err(IrError::op("Input", "inputs are bound by the evaluator, not evaluated"))
    }
}

/// A constant tensor (weights, folded values).
#[derive(Debug, Clone, PartialEq)]
pub struct Const(pub Arc<Tensor>);

impl OpDef for Const {
    fn name(&self) -> &'static str {
        "Constant"
    }
    fn output_facts(&self, inputs: &[&Fact]) -> IrResult<Vec<Fact>> {
        super::util::expect_inputs("Constant", inputs, 0, 0)?;
        Ok(vec![Fact::from_tensor(self.0.clone())])
    }
    fn eval(&self, _inputs: &[&Tensor]) -> IrResult<Vec<Tensor>> {
        Ok(vec![(*self.0).clone()])
    }
}

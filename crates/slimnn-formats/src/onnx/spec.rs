//! What the importer knows about each ONNX op before it builds anything: the opset it appeared
//! in, how many inputs and outputs it takes, and its attributes with their types. Every node is
//! checked against this table first, so a model is rejected as a whole (all unsupported ops
//! listed at once) before any graph is built.

use super::proto::attribute_proto::AttributeType;
use super::proto::{AttributeProto, TensorProto};

/// Attribute value types, as ONNX declares them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttrTy {
    F,
    I,
    S,
    T,
    Fs,
    Is,
    Ss,
}

impl AttrTy {
    fn name(self) -> &'static str {
        match self {
            AttrTy::F => "float",
            AttrTy::I => "int",
            AttrTy::S => "string",
            AttrTy::T => "tensor",
            AttrTy::Fs => "floats",
            AttrTy::Is => "ints",
            AttrTy::Ss => "strings",
        }
    }
}

/// When an attribute is required.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Req {
    No,
    Yes,
    /// Required in opsets below this one (where it later became an input).
    Before(i64),
}

#[derive(Debug, Clone, Copy)]
pub struct AttrSpec {
    pub name: &'static str,
    pub ty: AttrTy,
    pub req: Req,
}

const fn a(name: &'static str, ty: AttrTy) -> AttrSpec {
    AttrSpec { name, ty, req: Req::No }
}

const fn req(name: &'static str, ty: AttrTy) -> AttrSpec {
    AttrSpec { name, ty, req: Req::Yes }
}

#[derive(Debug, Clone, Copy)]
pub struct OpSpec {
    pub op: &'static str,
    /// First opset of the default domain that defines the op.
    pub since: i64,
    pub inputs: (usize, usize),
    pub outputs: (usize, usize),
    pub attrs: &'static [AttrSpec],
}

const MANY: usize = usize::MAX;

const fn op(
    op: &'static str,
    since: i64,
    inputs: (usize, usize),
    outputs: (usize, usize),
    attrs: &'static [AttrSpec],
) -> OpSpec {
    OpSpec { op, since, inputs, outputs, attrs }
}

const fn unary(name: &'static str, since: i64) -> OpSpec {
    op(name, since, (1, 1), (1, 1), &[])
}

const fn binary(name: &'static str, since: i64) -> OpSpec {
    op(name, since, (2, 2), (1, 1), &[])
}

use AttrTy::*;

const CONV_ATTRS: &[AttrSpec] =
    &[a("auto_pad", S), a("dilations", Is), a("group", I), a("kernel_shape", Is), a("pads", Is), a("strides", Is)];
const CONV_T_ATTRS: &[AttrSpec] = &[
    a("auto_pad", S),
    a("dilations", Is),
    a("group", I),
    a("kernel_shape", Is),
    a("pads", Is),
    a("strides", Is),
    a("output_padding", Is),
    a("output_shape", Is),
];
const REDUCE_ATTRS: &[AttrSpec] = &[a("axes", Is), a("keepdims", I), a("noop_with_empty_axes", I)];
const ARG_ATTRS: &[AttrSpec] = &[a("axis", I), a("keepdims", I), a("select_last_index", I)];
const SOFTMAX_ATTRS: &[AttrSpec] = &[a("axis", I)];

/// Every default-domain op the importer maps, with its signature.
pub const SPECS: &[OpSpec] = &[
    unary("Abs", 1),
    unary("Neg", 1),
    unary("Sqrt", 1),
    unary("Reciprocal", 1),
    unary("Exp", 1),
    unary("Log", 1),
    unary("Erf", 9),
    unary("Tanh", 1),
    unary("Sigmoid", 1),
    unary("Relu", 1),
    unary("Not", 1),
    unary("Floor", 1),
    unary("Ceil", 1),
    unary("Round", 11),
    unary("Sign", 9),
    unary("Sin", 7),
    unary("Cos", 7),
    unary("Softplus", 1),
    unary("HardSwish", 14),
    unary("Identity", 1),
    op("LeakyRelu", 1, (1, 1), (1, 1), &[a("alpha", F)]),
    op("Elu", 1, (1, 1), (1, 1), &[a("alpha", F)]),
    op("HardSigmoid", 1, (1, 1), (1, 1), &[a("alpha", F), a("beta", F)]),
    op("Gelu", 20, (1, 1), (1, 1), &[a("approximate", S)]),
    binary("Add", 1),
    binary("Sub", 1),
    binary("Mul", 1),
    binary("Div", 1),
    binary("Pow", 1),
    binary("PRelu", 1),
    binary("Equal", 1),
    binary("Less", 1),
    binary("LessOrEqual", 12),
    binary("Greater", 1),
    binary("GreaterOrEqual", 12),
    binary("And", 1),
    binary("Or", 1),
    binary("Xor", 1),
    op("Mod", 10, (2, 2), (1, 1), &[a("fmod", I)]),
    op("Sum", 1, (1, MANY), (1, 1), &[]),
    op("Mean", 1, (1, MANY), (1, 1), &[]),
    op("Max", 1, (1, MANY), (1, 1), &[]),
    op("Min", 1, (1, MANY), (1, 1), &[]),
    op("Where", 9, (3, 3), (1, 1), &[]),
    op("Cast", 1, (1, 1), (1, 1), &[req("to", I), a("saturate", I), a("round_mode", S)]),
    op("CastLike", 15, (2, 2), (1, 1), &[a("saturate", I), a("round_mode", S)]),
    op("Clip", 1, (1, 3), (1, 1), &[]),
    op("Dropout", 1, (1, 3), (1, 2), &[a("ratio", F), a("seed", I)]),
    op("MatMul", 1, (2, 2), (1, 1), &[]),
    op("Gemm", 1, (2, 3), (1, 1), &[a("alpha", F), a("beta", F), a("transA", I), a("transB", I)]),
    op("Softmax", 1, (1, 1), (1, 1), SOFTMAX_ATTRS),
    op("LogSoftmax", 1, (1, 1), (1, 1), SOFTMAX_ATTRS),
    op("LayerNormalization", 17, (2, 3), (1, 3), &[a("axis", I), a("epsilon", F), a("stash_type", I)]),
    op("BatchNormalization", 1, (5, 5), (1, 5), &[a("epsilon", F), a("momentum", F), a("training_mode", I)]),
    op("ReduceSum", 1, (1, 2), (1, 1), REDUCE_ATTRS),
    op("ReduceMean", 1, (1, 2), (1, 1), REDUCE_ATTRS),
    op("ReduceMax", 1, (1, 2), (1, 1), REDUCE_ATTRS),
    op("ReduceMin", 1, (1, 2), (1, 1), REDUCE_ATTRS),
    op("ReduceProd", 1, (1, 2), (1, 1), REDUCE_ATTRS),
    op("ReduceL1", 1, (1, 2), (1, 1), REDUCE_ATTRS),
    op("ReduceL2", 1, (1, 2), (1, 1), REDUCE_ATTRS),
    op("ReduceSumSquare", 1, (1, 2), (1, 1), REDUCE_ATTRS),
    op("ReduceLogSum", 1, (1, 2), (1, 1), REDUCE_ATTRS),
    op("ReduceLogSumExp", 1, (1, 2), (1, 1), REDUCE_ATTRS),
    op("ArgMax", 1, (1, 1), (1, 1), ARG_ATTRS),
    op("ArgMin", 1, (1, 1), (1, 1), ARG_ATTRS),
    op("Shape", 1, (1, 1), (1, 1), &[a("start", I), a("end", I)]),
    unary("Size", 1),
    op("Reshape", 5, (2, 2), (1, 1), &[a("allowzero", I)]),
    op("Transpose", 1, (1, 1), (1, 1), &[a("perm", Is)]),
    op("Unsqueeze", 1, (1, 2), (1, 1), &[AttrSpec { name: "axes", ty: Is, req: Req::Before(13) }]),
    op("Squeeze", 1, (1, 2), (1, 1), &[a("axes", Is)]),
    op("Concat", 4, (1, MANY), (1, 1), &[req("axis", I)]),
    op("Slice", 10, (3, 5), (1, 1), &[]),
    op("Split", 2, (1, 2), (1, MANY), &[a("axis", I), a("split", Is), a("num_outputs", I)]),
    op("Expand", 8, (2, 2), (1, 1), &[]),
    op("Gather", 1, (2, 2), (1, 1), &[a("axis", I)]),
    op("ConstantOfShape", 9, (1, 1), (1, 1), &[a("value", T)]),
    op("Range", 11, (3, 3), (1, 1), &[]),
    op("Flatten", 1, (1, 1), (1, 1), &[a("axis", I)]),
    op("Pad", 11, (2, 4), (1, 1), &[a("mode", S)]),
    op("Tile", 6, (2, 2), (1, 1), &[]),
    op("Conv", 1, (2, 3), (1, 1), CONV_ATTRS),
    op("ConvTranspose", 1, (2, 3), (1, 1), CONV_T_ATTRS),
    op(
        "MaxPool",
        1,
        (1, 1),
        (1, 2),
        &[
            a("auto_pad", S),
            a("ceil_mode", I),
            a("dilations", Is),
            req("kernel_shape", Is),
            a("pads", Is),
            a("storage_order", I),
            a("strides", Is),
        ],
    ),
    op(
        "AveragePool",
        1,
        (1, 1),
        (1, 1),
        &[
            a("auto_pad", S),
            a("ceil_mode", I),
            a("count_include_pad", I),
            a("dilations", Is),
            req("kernel_shape", Is),
            a("pads", Is),
            a("strides", Is),
        ],
    ),
    unary("GlobalAveragePool", 1),
    unary("GlobalMaxPool", 1),
    op(
        "Resize",
        10,
        (1, 4),
        (1, 1),
        &[
            a("antialias", I),
            a("axes", Is),
            a("coordinate_transformation_mode", S),
            a("cubic_coeff_a", F),
            a("exclude_outside", I),
            a("extrapolation_value", F),
            a("keep_aspect_ratio_policy", S),
            a("mode", S),
            a("nearest_mode", S),
        ],
    ),
    op(
        "QuantizeLinear",
        10,
        (2, 3),
        (1, 1),
        &[a("axis", I), a("saturate", I), a("block_size", I), a("output_dtype", I), a("precision", I)],
    ),
    op("DequantizeLinear", 10, (2, 3), (1, 1), &[a("axis", I), a("block_size", I), a("output_dtype", I)]),
    op("DynamicQuantizeLinear", 11, (1, 1), (3, 3), &[]),
    op("MatMulInteger", 10, (2, 4), (1, 1), &[]),
    op("ConvInteger", 10, (2, 4), (1, 1), CONV_ATTRS),
    op("QLinearMatMul", 10, (8, 8), (1, 1), &[]),
    op("QLinearConv", 10, (8, 9), (1, 1), CONV_ATTRS),
    op(
        "Constant",
        1,
        (0, 0),
        (1, 1),
        &[
            a("value", T),
            a("value_float", F),
            a("value_floats", Fs),
            a("value_int", I),
            a("value_ints", Is),
            a("value_string", S),
            a("value_strings", Ss),
        ],
    ),
];

pub fn spec(op_type: &str) -> Option<&'static OpSpec> {
    SPECS.iter().find(|s| s.op == op_type)
}

/// The type of an attribute: its declared `type`, or, for writers that leave it out, the one
/// field that is set.
pub fn attr_type(at: &AttributeProto) -> Option<AttrTy> {
    match AttributeType::try_from(at.r#type.unwrap_or(0)).unwrap_or(AttributeType::Undefined) {
        AttributeType::Float => Some(F),
        AttributeType::Int => Some(I),
        AttributeType::String => Some(S),
        AttributeType::Tensor => Some(T),
        AttributeType::Floats => Some(Fs),
        AttributeType::Ints => Some(Is),
        AttributeType::Strings => Some(Ss),
        AttributeType::Undefined => {
            if at.f.is_some() {
                Some(F)
            } else if at.i.is_some() {
                Some(I)
            } else if at.s.is_some() {
                Some(S)
            } else if at.t.is_some() {
                Some(T)
            } else if !at.floats.is_empty() {
                Some(Fs)
            } else if !at.ints.is_empty() {
                Some(Is)
            } else if !at.strings.is_empty() {
                Some(Ss)
            } else {
                None
            }
        }
        _ => None,
    }
}

/// Checks the attributes of a node against its spec: required ones present, known ones of the
/// declared type. Returns a message on the first problem.
pub fn check_attrs(spec: &OpSpec, attrs: &[AttributeProto], opset: i64) -> Result<(), String> {
    for s in spec.attrs {
        let found = attrs.iter().find(|at| at.name.as_deref() == Some(s.name));
        let required = match s.req {
            Req::No => false,
            Req::Yes => true,
            Req::Before(v) => opset < v,
        };
        match found {
            None if required => return Err(format!("required attribute '{}' is missing", s.name)),
            None => {}
            Some(at) => match attr_type(at) {
                Some(t) if t == s.ty => {}
                // An empty list carries no field, so its type may be unknowable.
                None if matches!(s.ty, Fs | Is | Ss) => {}
                other => {
                    return Err(format!(
                        "attribute '{}' must be {}, got {}",
                        s.name,
                        s.ty.name(),
                        other.map_or("an unknown type", |t| t.name())
                    ))
                }
            },
        }
    }
    Ok(())
}

/// Typed read access to a node's attributes (already checked against the spec).
pub struct Attrs<'a> {
    pub list: &'a [AttributeProto],
}

impl<'a> Attrs<'a> {
    fn get(&self, name: &str) -> Option<&'a AttributeProto> {
        self.list.iter().find(|a| a.name.as_deref() == Some(name))
    }

    pub fn has(&self, name: &str) -> bool {
        self.get(name).is_some()
    }

    pub fn i(&self, name: &str) -> Option<i64> {
        self.get(name).and_then(|a| a.i)
    }

    pub fn i_or(&self, name: &str, d: i64) -> i64 {
        self.i(name).unwrap_or(d)
    }

    pub fn f(&self, name: &str) -> Option<f32> {
        self.get(name).and_then(|a| a.f)
    }

    pub fn f_or(&self, name: &str, d: f32) -> f32 {
        self.f(name).unwrap_or(d)
    }

    pub fn s(&self, name: &str) -> Option<String> {
        self.get(name).and_then(|a| a.s.as_ref()).map(|s| String::from_utf8_lossy(s).into_owned())
    }

    pub fn s_or(&self, name: &str, d: &str) -> String {
        self.s(name).unwrap_or_else(|| d.to_string())
    }

    pub fn ints(&self, name: &str) -> Option<&'a [i64]> {
        self.get(name).map(|a| a.ints.as_slice())
    }

    pub fn floats(&self, name: &str) -> Option<&'a [f32]> {
        self.get(name).map(|a| a.floats.as_slice())
    }

    pub fn t(&self, name: &str) -> Option<&'a TensorProto> {
        self.get(name).and_then(|a| a.t.as_ref())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn int_attr(name: &str, v: i64) -> AttributeProto {
        AttributeProto {
            name: Some(name.into()),
            r#type: Some(AttributeType::Int as i32),
            i: Some(v),
            ..Default::default()
        }
    }

    #[test]
    fn names_are_unique() {
        for (i, s) in SPECS.iter().enumerate() {
            assert!(SPECS[..i].iter().all(|o| o.op != s.op), "{} listed twice", s.op);
        }
    }

    #[test]
    fn attribute_checks() {
        let concat = spec("Concat").unwrap();
        assert!(check_attrs(concat, &[int_attr("axis", 0)], 13).is_ok());
        assert_eq!(check_attrs(concat, &[], 13).unwrap_err(), "required attribute 'axis' is missing");
        let mut f = int_attr("axis", 0);
        f.r#type = Some(AttributeType::Float as i32);
        f.i = None;
        f.f = Some(1.0);
        assert_eq!(check_attrs(concat, &[f], 13).unwrap_err(), "attribute 'axis' must be int, got float");
        let unsq = spec("Unsqueeze").unwrap();
        assert!(check_attrs(unsq, &[], 11).is_err());
        assert!(check_attrs(unsq, &[], 13).is_ok());
        // A writer that omits `type` is read by the field it set.
        let mut untyped = int_attr("axis", 1);
        untyped.r#type = None;
        assert!(check_attrs(concat, &[untyped], 13).is_ok());
    }
}

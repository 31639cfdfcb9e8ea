//! What the importer knows about each ONNX op before it builds anything: which of the op's
//! versions it reads, how many inputs and outputs it takes, and its attributes with their types.
//! Every node is checked against this table first, so a model is rejected as a whole (all
//! unsupported ops listed at once) before any graph is built.
//!
//! A node's version is the op's effective version at the model's opset: the largest
//! `since_version` of the op (from the generated [`op_versions`](super::op_versions) table) not
//! above the opset. Each op lists the versions it reads; a version that only added types (most
//! of those from opset 19 on add float8 / int4 / float4 types slimnn does not have) is read as
//! the one before, and older forms (attributes that later became inputs) are converted by
//! `convert.rs`. Versions not listed, e.g. ones whose semantics slimnn does not implement, are
//! reported as unsupported.

use super::op_versions::{Change, OP_VERSIONS};
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
    /// Required in op versions below this one (where it later became an input).
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

const fn req_before(name: &'static str, ty: AttrTy, version: i64) -> AttrSpec {
    AttrSpec { name, ty, req: Req::Before(version) }
}

#[derive(Debug, Clone, Copy)]
pub struct OpSpec {
    pub op: &'static str,
    /// The op's versions (`since_version`s) the importer reads.
    pub versions: &'static [i64],
    /// Input counts of the newest form (see [`input_range`] for older ones).
    pub inputs: (usize, usize),
    pub outputs: (usize, usize),
    /// Attributes of every version read, legacy ones included.
    pub attrs: &'static [AttrSpec],
}

const MANY: usize = usize::MAX;

const fn op(
    op: &'static str,
    versions: &'static [i64],
    inputs: (usize, usize),
    outputs: (usize, usize),
    attrs: &'static [AttrSpec],
) -> OpSpec {
    OpSpec { op, versions, inputs, outputs, attrs }
}

const fn unary(name: &'static str, versions: &'static [i64]) -> OpSpec {
    op(name, versions, (1, 1), (1, 1), &[])
}

const fn binary(name: &'static str, versions: &'static [i64]) -> OpSpec {
    op(name, versions, (2, 2), (1, 1), &[])
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

// Version lists shared by several ops. Version 1 of many older ops had a `consumed_inputs`
// attribute (6 dropped it) and binary ops had `broadcast` / `axis` before 7: those versions
// are left out.
const V_6_13: &[i64] = &[6, 13];
const V_BINARY: &[i64] = &[7, 13, 14];
const V_COMPARE: &[i64] = &[7, 9, 13];
const V_REDUCE: &[i64] = &[1, 11, 13, 18];
const V_REDUCE_MINMAX: &[i64] = &[1, 11, 12, 13, 18, 20];
const V_REDUCE_LOG: &[i64] = &[1, 11, 13, 18, 28];
const V_ARG: &[i64] = &[1, 11, 12, 13];
const V_VARIADIC: &[i64] = &[6, 8, 13];
const V_VARIADIC_MINMAX: &[i64] = &[6, 8, 12, 13];
const V_SOFTMAX: &[i64] = &[1, 11, 13];
const V_SQUEEZE: &[i64] = &[1, 11, 13, 21, 23, 24, 25];
const ARG_ATTRS: &[AttrSpec] = &[a("axis", I), a("keepdims", I), a("select_last_index", I)];
const SOFTMAX_ATTRS: &[AttrSpec] = &[a("axis", I)];

/// Every default-domain op the importer maps, with the versions it reads and its signature.
pub const SPECS: &[OpSpec] = &[
    unary("Abs", V_6_13),
    unary("Neg", V_6_13),
    unary("Sqrt", V_6_13),
    unary("Reciprocal", V_6_13),
    unary("Exp", V_6_13),
    unary("Log", V_6_13),
    unary("Erf", &[9, 13]),
    unary("Tanh", V_6_13),
    unary("Sigmoid", V_6_13),
    unary("Relu", &[6, 13, 14]),
    unary("Not", &[1]),
    unary("Floor", V_6_13),
    unary("Ceil", V_6_13),
    unary("Round", &[11, 22]),
    unary("Sign", &[9, 13]),
    unary("Sin", &[7, 22]),
    unary("Cos", &[7, 22]),
    unary("Softplus", &[1, 22]),
    unary("HardSwish", &[14, 22]),
    // 14 and 16 add sequence and optional types, which graph inputs cannot carry here.
    unary("Identity", &[1, 13, 14, 16, 19, 21, 23, 24, 25]),
    op("LeakyRelu", &[6, 16], (1, 1), (1, 1), &[a("alpha", F)]),
    op("Elu", &[6, 22], (1, 1), (1, 1), &[a("alpha", F)]),
    op("HardSigmoid", &[6, 22], (1, 1), (1, 1), &[a("alpha", F), a("beta", F)]),
    op("Gelu", &[20], (1, 1), (1, 1), &[a("approximate", S)]),
    binary("Add", V_BINARY),
    binary("Sub", V_BINARY),
    binary("Mul", V_BINARY),
    binary("Div", V_BINARY),
    binary("Pow", &[7, 12, 13, 15]),
    binary("PRelu", &[7, 9, 16]),
    binary("Equal", &[7, 11, 13, 19]),
    binary("Less", V_COMPARE),
    binary("LessOrEqual", &[12, 16]),
    binary("Greater", V_COMPARE),
    binary("GreaterOrEqual", &[12, 16]),
    binary("And", &[7]),
    binary("Or", &[7]),
    binary("Xor", &[7]),
    // 28 defines fmod = 0 for floats too (slimnn's Mod refuses those at build time).
    op("Mod", &[10, 13, 28], (2, 2), (1, 1), &[a("fmod", I)]),
    // 6 required equal shapes; 8 broadcasts, which covers it.
    op("Sum", V_VARIADIC, (1, MANY), (1, 1), &[]),
    op("Mean", V_VARIADIC, (1, MANY), (1, 1), &[]),
    op("Max", V_VARIADIC_MINMAX, (1, MANY), (1, 1), &[]),
    op("Min", V_VARIADIC_MINMAX, (1, MANY), (1, 1), &[]),
    op("Where", &[9, 16], (3, 3), (1, 1), &[]),
    // saturate (19) and round_mode (24) only concern float8 targets, which slimnn lacks.
    op(
        "Cast",
        &[6, 9, 13, 19, 21, 23, 24, 25, 28],
        (1, 1),
        (1, 1),
        &[req("to", I), a("saturate", I), a("round_mode", S)],
    ),
    op("CastLike", &[15, 19, 21, 23, 24, 25], (2, 2), (1, 1), &[a("saturate", I), a("round_mode", S)]),
    // 6: min / max attributes (converted to constant inputs).
    op("Clip", &[6, 11, 12, 13], (1, 3), (1, 1), &[a("min", F), a("max", F)]),
    // Before 12: the ratio attribute (inference ignores it).
    op("Dropout", &[7, 10, 12, 13, 22], (1, 3), (1, 2), &[a("ratio", F), a("seed", I)]),
    op("MatMul", &[1, 9, 13], (2, 2), (1, 1), &[]),
    op("Gemm", &[7, 9, 11, 13], (2, 3), (1, 1), &[a("alpha", F), a("beta", F), a("transA", I), a("transB", I)]),
    // Before 13: the 2-d coerced form.
    op("Softmax", V_SOFTMAX, (1, 1), (1, 1), SOFTMAX_ATTRS),
    op("LogSoftmax", V_SOFTMAX, (1, 1), (1, 1), SOFTMAX_ATTRS),
    op("LayerNormalization", &[17], (2, 3), (1, 3), &[a("axis", I), a("epsilon", F), a("stash_type", I)]),
    // 7: only with spatial = 1, the form 9 kept.
    op(
        "BatchNormalization",
        &[7, 9, 14, 15],
        (5, 5),
        (1, 5),
        &[a("epsilon", F), a("momentum", F), a("training_mode", I), a("spatial", I)],
    ),
    op("ReduceSum", &[1, 11, 13], (1, 2), (1, 1), REDUCE_ATTRS),
    op("ReduceMean", V_REDUCE, (1, 2), (1, 1), REDUCE_ATTRS),
    op("ReduceMax", V_REDUCE_MINMAX, (1, 2), (1, 1), REDUCE_ATTRS),
    op("ReduceMin", V_REDUCE_MINMAX, (1, 2), (1, 1), REDUCE_ATTRS),
    op("ReduceProd", V_REDUCE, (1, 2), (1, 1), REDUCE_ATTRS),
    op("ReduceL1", V_REDUCE, (1, 2), (1, 1), REDUCE_ATTRS),
    op("ReduceL2", V_REDUCE, (1, 2), (1, 1), REDUCE_ATTRS),
    op("ReduceSumSquare", V_REDUCE, (1, 2), (1, 1), REDUCE_ATTRS),
    // 28 drops integer types.
    op("ReduceLogSum", V_REDUCE_LOG, (1, 2), (1, 1), REDUCE_ATTRS),
    op("ReduceLogSumExp", V_REDUCE_LOG, (1, 2), (1, 1), REDUCE_ATTRS),
    op("ArgMax", V_ARG, (1, 1), (1, 1), ARG_ATTRS),
    op("ArgMin", V_ARG, (1, 1), (1, 1), ARG_ATTRS),
    op("Shape", &[1, 13, 15, 19, 21, 23, 24, 25], (1, 1), (1, 1), &[a("start", I), a("end", I)]),
    unary("Size", &[1, 13, 19, 21, 23, 24, 25]),
    op("Reshape", &[5, 13, 14, 19, 21, 23, 24, 25], (2, 2), (1, 1), &[a("allowzero", I)]),
    op("Transpose", &[1, 13, 21, 23, 24, 25], (1, 1), (1, 1), &[a("perm", Is)]),
    // Before 13: the axes attribute.
    op("Unsqueeze", V_SQUEEZE, (1, 2), (1, 1), &[req_before("axes", Is, 13)]),
    op("Squeeze", V_SQUEEZE, (1, 2), (1, 1), &[a("axes", Is)]),
    op("Concat", &[4, 11, 13], (1, MANY), (1, 1), &[req("axis", I)]),
    // 1: starts, ends and axes attributes (converted to constant inputs).
    op(
        "Slice",
        &[1, 10, 11, 13],
        (3, 5),
        (1, 1),
        &[req_before("starts", Is, 10), req_before("ends", Is, 10), a("axes", Is)],
    ),
    // Before 13: the split attribute.
    op("Split", &[2, 11, 13, 18], (1, 2), (1, MANY), &[a("axis", I), a("split", Is), a("num_outputs", I)]),
    op("Expand", &[8, 13], (2, 2), (1, 1), &[]),
    op("Gather", &[1, 11, 13], (2, 2), (1, 1), &[a("axis", I)]),
    op("ConstantOfShape", &[9, 20, 21, 23, 24, 25], (1, 1), (1, 1), &[a("value", T)]),
    // 27: stash_type, which only matters for float16 / bfloat16 (float is what slimnn does).
    op("Range", &[11, 27], (3, 3), (1, 1), &[a("stash_type", I)]),
    op("Flatten", &[1, 9, 11, 13, 21, 23, 24, 25], (1, 1), (1, 1), &[a("axis", I)]),
    // 2: pads and value attributes (converted to constant inputs); 19 adds the wrap mode.
    op(
        "Pad",
        &[2, 11, 13, 18, 19, 21, 23, 24, 25],
        (2, 4),
        (1, 1),
        &[a("mode", S), req_before("pads", Is, 11), a("value", F)],
    ),
    op("Tile", &[6, 13], (2, 2), (1, 1), &[]),
    op("Conv", &[1, 11, 22], (2, 3), (1, 1), CONV_ATTRS),
    op("ConvTranspose", &[1, 11, 22], (2, 3), (1, 1), CONV_T_ATTRS),
    op(
        "MaxPool",
        &[1, 8, 10, 11, 12, 22],
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
        &[1, 7, 10, 11, 19, 22],
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
    unary("GlobalAveragePool", &[1, 22]),
    unary("GlobalMaxPool", &[1, 22]),
    // 10: (X, scales) with asymmetric coordinates, converted.
    op(
        "Resize",
        &[10, 11, 13, 18, 19],
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
        &[10, 13, 19, 21, 23, 24, 25, 28],
        (2, 3),
        (1, 1),
        &[a("axis", I), a("saturate", I), a("block_size", I), a("output_dtype", I), a("precision", I)],
    ),
    op(
        "DequantizeLinear",
        &[10, 13, 19, 21, 23, 24, 25, 28],
        (2, 3),
        (1, 1),
        &[a("axis", I), a("block_size", I), a("output_dtype", I)],
    ),
    op("DynamicQuantizeLinear", &[11], (1, 1), (3, 3), &[]),
    op("MatMulInteger", &[10], (2, 4), (1, 1), &[]),
    op("ConvInteger", &[10], (2, 4), (1, 1), CONV_ATTRS),
    op("QLinearMatMul", &[10, 21], (8, 8), (1, 1), &[]),
    op("QLinearConv", &[10], (8, 9), (1, 1), CONV_ATTRS),
    op(
        "Constant",
        &[1, 9, 11, 12, 13, 19, 21, 23, 24, 25],
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

/// The versions of a default-domain op, ascending; `None` for names ONNX does not define.
pub fn history(op_type: &str) -> Option<&'static [(i64, Change)]> {
    OP_VERSIONS.binary_search_by(|(name, _)| (*name).cmp(op_type)).ok().map(|i| OP_VERSIONS[i].1)
}

/// The op's effective version at `opset`: its largest `since_version` not above it.
pub fn effective_version(op_type: &str, opset: i64) -> Option<i64> {
    history(op_type)?.iter().map(|&(v, _)| v).filter(|&v| v <= opset).max()
}

/// Input counts of the op's form at `version`: older forms held some inputs as attributes.
pub fn input_range(spec: &OpSpec, version: i64) -> (usize, usize) {
    match spec.op {
        "Slice" if version < 10 => (1, 1),
        "Clip" | "Pad" if version < 11 => (1, 1),
        "Dropout" if version < 12 => (1, 1),
        "Squeeze" | "Unsqueeze" | "Split" if version < 13 => (1, 1),
        "ReduceSum" if version < 13 => (1, 1),
        op if op.starts_with("Reduce") && version < 18 && op != "ReduceSum" => (1, 1),
        "Resize" if version < 11 => (2, 2),
        "Gemm" if version < 11 => (3, 3),
        _ => spec.inputs,
    }
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

/// Checks the attributes of a node (of op version `version`) against its spec: required ones
/// present, known ones of the declared type. Returns a message on the first problem.
pub fn check_attrs(spec: &OpSpec, attrs: &[AttributeProto], version: i64) -> Result<(), String> {
    for s in spec.attrs {
        let found = attrs.iter().find(|at| at.name.as_deref() == Some(s.name));
        let required = match s.req {
            Req::No => false,
            Req::Yes => true,
            Req::Before(v) => version < v,
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
    fn versions_come_from_the_table() {
        let table: Vec<&str> = OP_VERSIONS.iter().map(|(n, _)| *n).collect();
        let mut sorted = table.clone();
        sorted.sort_unstable();
        assert_eq!(table, sorted, "OP_VERSIONS must stay sorted for binary search");
        for s in SPECS {
            let h = history(s.op).unwrap_or_else(|| panic!("{} is not an ONNX op", s.op));
            assert!(!s.versions.is_empty(), "{} reads no version", s.op);
            for v in s.versions {
                assert!(h.iter().any(|(x, _)| x == v), "{} has no version {v}", s.op);
            }
            assert!(s.versions.windows(2).all(|w| w[0] < w[1]), "{}: versions not ascending", s.op);
        }
    }

    #[test]
    fn effective_versions() {
        assert_eq!(effective_version("Unsqueeze", 12), Some(11));
        assert_eq!(effective_version("Unsqueeze", 13), Some(13));
        assert_eq!(effective_version("Cast", 28), Some(28));
        assert_eq!(effective_version("Relu", 28), Some(14));
        assert_eq!(effective_version("Gelu", 19), None);
        assert_eq!(effective_version("NoSuchOp", 19), None);
        let slice = spec("Slice").unwrap();
        assert_eq!((input_range(slice, 1), input_range(slice, 13)), ((1, 1), (3, 5)));
        let rmax = spec("ReduceMax").unwrap();
        assert_eq!((input_range(rmax, 13), input_range(rmax, 18)), ((1, 1), (1, 2)));
        assert_eq!(input_range(spec("ReduceSum").unwrap(), 13), (1, 2));
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

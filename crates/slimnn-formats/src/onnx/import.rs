//! ModelProto -> Graph. Every node is checked first (op version read at the model's opset,
//! attributes, inputs defined, features supported), and only then is the graph built.

use super::convert::{self, Cx};
use super::proto::{type_proto, GraphProto, ModelProto, NodeProto, ValueInfoProto};
use super::spec::{self, Attrs, OpSpec};
use super::tensor::{dtype_from_onnx, tensor_from_proto};
use super::{MAX_OPSET, MIN_OPSET};
use crate::{FormatError, Result};
use slimnn_ir::{Fact, Graph, OutletId};
use slimnn_tensor::{Dim, Tensor};
use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, HashSet};
use std::path::Path;
use std::sync::Arc;

fn is_default_domain(d: Option<&str>) -> bool {
    matches!(d, None | Some("") | Some("ai.onnx"))
}

/// Name used for a node in messages and in the graph: its own, or `<op>_<index>`.
fn node_name(n: &NodeProto, index: usize) -> String {
    match n.name.as_deref() {
        Some(s) if !s.is_empty() => s.to_string(),
        _ => format!("{}_{index}", n.op_type.as_deref().unwrap_or("node")),
    }
}

pub(super) fn import(model: &ModelProto, base_dir: Option<&Path>) -> Result<Graph> {
    let gp = model.graph.as_ref().ok_or_else(|| FormatError::malformed("model", "it has no graph"))?;
    let opsets: HashMap<String, i64> = model
        .opset_import
        .iter()
        .map(|o| {
            let d = o.domain.clone().unwrap_or_default();
            (if d == "ai.onnx" { String::new() } else { d }, o.version.unwrap_or(0))
        })
        .collect();
    let has_default_nodes = gp.node.iter().any(|n| is_default_domain(n.domain.as_deref()));
    let opset = match opsets.get("") {
        Some(&v) if (MIN_OPSET..=MAX_OPSET).contains(&v) => v,
        Some(&v) => {
            return Err(FormatError::Unsupported(format!(
                "the model uses ONNX opset {v}; slimnn imports opsets {MIN_OPSET} to {MAX_OPSET}"
            )))
        }
        None if has_default_nodes => {
            return Err(FormatError::malformed(
                "model",
                "it uses default-domain ops but imports no default-domain opset",
            ))
        }
        None => MAX_OPSET,
    };
    if !gp.sparse_initializer.is_empty() {
        return Err(FormatError::Unsupported("sparse initializers are not supported".into()));
    }
    let (order, versions) = check(gp, opset, &opsets)?;
    let mut g = build(gp, opset, &versions, &order, base_dir)?;
    for kv in &model.metadata_props {
        if let Some(k) = &kv.key {
            g.metadata.insert(k.clone(), kv.value.clone().unwrap_or_default());
        }
    }
    Ok(g)
}

/// The version of the spec's op the importer reads at `opset` (its effective version there), or
/// why it reads none: "op Gelu (opset 17): Gelu needs opset 20", "op Foo version 23 (opset 23):
/// not supported".
fn read_version(spec: &OpSpec, opset: i64) -> std::result::Result<i64, String> {
    let op = spec.op;
    let Some(version) = spec::effective_version(op, opset) else {
        let first = spec::history(op).and_then(|h| h.first()).map_or(0, |v| v.0);
        return Err(format!("op {op} (opset {opset}): {op} needs opset {first}"));
    };
    if !spec.versions.contains(&version) {
        return Err(format!("op {op} version {version} (opset {opset}): not supported"));
    }
    Ok(version)
}

/// Validates every node and returns an execution order (the file's order when it is already
/// topological, which ONNX requires but not every writer honours) and each node's op version.
fn check(gp: &GraphProto, opset: i64, opsets: &HashMap<String, i64>) -> Result<(Vec<usize>, Vec<i64>)> {
    let initial: HashSet<&str> = gp
        .initializer
        .iter()
        .filter_map(|t| t.name.as_deref())
        .chain(gp.input.iter().filter_map(|v| v.name.as_deref()))
        .collect();
    let mut producer: HashMap<&str, usize> = HashMap::new();
    for (i, n) in gp.node.iter().enumerate() {
        for out in n.output.iter().filter(|o| !o.is_empty()) {
            if initial.contains(out.as_str()) || producer.insert(out, i).is_some() {
                return Err(FormatError::malformed(
                    format!("node '{}'", node_name(n, i)),
                    format!("value '{out}' is produced twice"),
                ));
            }
        }
    }
    let mut used: HashSet<&str> = gp.output.iter().filter_map(|v| v.name.as_deref()).collect();
    for n in &gp.node {
        used.extend(n.input.iter().map(String::as_str));
    }

    let mut unsupported = Vec::new();
    let mut first_error: Option<FormatError> = None;
    let mut versions = vec![0; gp.node.len()];
    for (i, n) in gp.node.iter().enumerate() {
        let name = node_name(n, i);
        let op_type = n.op_type.as_deref().unwrap_or("");
        let label = || format!("node '{name}' ({op_type})");
        if convert::is_microsoft_op(n.domain.as_deref(), op_type) {
            versions[i] = 1;
            if let Some(why) = convert::microsoft_op_problem(op_type, &Attrs { list: &n.attribute }, n.input.len()) {
                first_error.get_or_insert_with(|| FormatError::malformed(label(), why));
            }
            continue;
        }
        if !is_default_domain(n.domain.as_deref()) {
            let d = n.domain.as_deref().unwrap_or("");
            let v = opsets.get(d).map_or("?".to_string(), |v| v.to_string());
            unsupported.push(format!("node '{name}' op {d}.{op_type} (opset {v})"));
            continue;
        }
        let entry = format!("node '{name}' op {op_type} (opset {opset})");
        let Some(spec) = spec::spec(op_type) else {
            unsupported.push(entry);
            continue;
        };
        let version = match read_version(spec, opset) {
            Ok(v) => v,
            Err(why) => {
                unsupported.push(format!("node '{name}' {why}"));
                continue;
            }
        };
        versions[i] = version;
        let ni = n.input.len();
        let no = n.output.len();
        let inputs = spec::input_range(spec, version);
        let err = if ni > inputs.1 || n.input.iter().take(inputs.0).any(String::is_empty) || ni < inputs.0 {
            Some(format!(
                "takes {} inputs at version {version}, got {ni} ({:?})",
                if inputs.0 == inputs.1 { inputs.0.to_string() } else { format!("{} to {}", inputs.0, inputs.1) },
                n.input
            ))
        } else if no > spec.outputs.1
            || no < spec.outputs.0
            || n.output.iter().take(spec.outputs.0).any(String::is_empty)
        {
            Some(format!("has {no} outputs, expected {} to {}", spec.outputs.0, spec.outputs.1))
        } else {
            spec::check_attrs(spec, &n.attribute, version).err()
        };
        if let Some(msg) = err {
            first_error.get_or_insert_with(|| FormatError::malformed(label(), msg));
            continue;
        }
        let used_out: Vec<bool> = n.output.iter().map(|o| !o.is_empty() && used.contains(o.as_str())).collect();
        if let Some(why) = convert::static_unsupported(op_type, version, &Attrs { list: &n.attribute }, &used_out) {
            unsupported.push(format!("node '{name}' op {op_type} version {version} (opset {opset}): {why}"));
        }
    }
    if !unsupported.is_empty() {
        return Err(FormatError::UnsupportedOps(unsupported));
    }
    if let Some(e) = first_error {
        return Err(e);
    }

    // Dangling edges, then a stable topological order (Kahn, smallest index first).
    let mut deps: Vec<Vec<usize>> = vec![Vec::new(); gp.node.len()];
    let mut indegree = vec![0usize; gp.node.len()];
    for (i, n) in gp.node.iter().enumerate() {
        for inp in n.input.iter().filter(|s| !s.is_empty()) {
            if initial.contains(inp.as_str()) {
                continue;
            }
            match producer.get(inp.as_str()) {
                Some(&p) => {
                    deps[p].push(i);
                    indegree[i] += 1;
                }
                None => {
                    return Err(FormatError::malformed(
                        format!("node '{}' ({})", node_name(n, i), n.op_type.as_deref().unwrap_or("")),
                        format!("input '{inp}' is not produced by any node, initializer or graph input"),
                    ))
                }
            }
        }
    }
    for out in &gp.output {
        let name = out.name.as_deref().unwrap_or("");
        if !initial.contains(name) && !producer.contains_key(name) {
            return Err(FormatError::malformed(
                "graph",
                format!("output '{name}' is not produced by any node, initializer or graph input"),
            ));
        }
    }
    let mut ready: BinaryHeap<Reverse<usize>> = (0..gp.node.len()).filter(|&i| indegree[i] == 0).map(Reverse).collect();
    let mut order = Vec::with_capacity(gp.node.len());
    while let Some(Reverse(i)) = ready.pop() {
        order.push(i);
        for &c in &deps[i] {
            indegree[c] -= 1;
            if indegree[c] == 0 {
                ready.push(Reverse(c));
            }
        }
    }
    if order.len() != gp.node.len() {
        let stuck = (0..gp.node.len()).find(|&i| indegree[i] > 0).unwrap_or(0);
        return Err(FormatError::malformed(
            format!("node '{}'", node_name(&gp.node[stuck], stuck)),
            "it is part of a cycle",
        ));
    }
    Ok((order, versions))
}

/// The fact a graph input declares.
fn input_fact(v: &ValueInfoProto) -> Result<Fact> {
    let name = v.name.as_deref().unwrap_or("");
    let unsupported = |msg: &str| FormatError::Unsupported(format!("graph input '{name}': {msg}"));
    let Some(type_proto::Value::TensorType(tt)) = v.r#type.as_ref().and_then(|t| t.value.as_ref()) else {
        return Err(unsupported("only tensor inputs are supported"));
    };
    let dtype = dtype_from_onnx(tt.elem_type.unwrap_or(0)).map_err(|e| unsupported(&e.to_string()))?;
    let shape = tt.shape.as_ref().ok_or_else(|| unsupported("its shape (rank) is not declared"))?;
    use super::proto::tensor_shape_proto::dimension::Value;
    let dims = shape
        .dim
        .iter()
        .map(|d| match &d.value {
            Some(Value::DimValue(n)) if *n >= 0 => Dim::Known(*n as usize),
            Some(Value::DimParam(p)) if !p.is_empty() => Dim::sym(p),
            _ => Dim::Unknown,
        })
        .collect();
    Ok(Fact::new(dtype, dims))
}

/// A named value while building: a graph outlet, or a constant (initializer or `Constant`
/// node) not added to the graph until something reads it as a graph value.
enum Val {
    Outlet(OutletId),
    Pending(Arc<Tensor>),
}

struct Values {
    map: HashMap<String, Val>,
}

impl Values {
    fn outlet(&mut self, g: &mut Graph, name: &str) -> Result<Option<OutletId>> {
        match self.map.get(name) {
            None => Ok(None),
            Some(Val::Outlet(o)) => Ok(Some(*o)),
            Some(Val::Pending(t)) => {
                let o = g.add_const(name, t.clone())?;
                g.set_outlet_name(o, name);
                self.map.insert(name.to_string(), Val::Outlet(o));
                Ok(Some(o))
            }
        }
    }

    fn konst(&self, g: &Graph, name: &str) -> Option<Arc<Tensor>> {
        match self.map.get(name)? {
            Val::Outlet(o) => g.fact(*o).konst.clone(),
            Val::Pending(t) => Some(t.clone()),
        }
    }
}

fn build(gp: &GraphProto, opset: i64, versions: &[i64], order: &[usize], base_dir: Option<&Path>) -> Result<Graph> {
    let mut g = Graph::default();
    let mut values = Values { map: HashMap::new() };
    let init_names: HashSet<&str> = gp.initializer.iter().filter_map(|t| t.name.as_deref()).collect();
    for v in &gp.input {
        let name = v.name.as_deref().unwrap_or("");
        if init_names.contains(name) {
            continue;
        }
        let o = g.add_input(name, input_fact(v)?)?;
        g.set_outlet_name(o, name);
        values.map.insert(name.to_string(), Val::Outlet(o));
    }
    for t in &gp.initializer {
        let name = t.name.as_deref().unwrap_or("");
        let tensor = tensor_from_proto(t, base_dir)?;
        values.map.insert(name.to_string(), Val::Pending(Arc::new(tensor)));
    }
    let mut used: HashSet<&str> = gp.output.iter().filter_map(|v| v.name.as_deref()).collect();
    for n in &gp.node {
        used.extend(n.input.iter().map(String::as_str));
    }
    for &i in order {
        let n = &gp.node[i];
        let name = node_name(n, i);
        let op_type = n.op_type.as_deref().unwrap_or("");
        if op_type == "Constant" {
            let t = convert::constant_value(&name, &Attrs { list: &n.attribute }, base_dir)?;
            if let Some(out) = n.output.first() {
                values.map.insert(out.clone(), Val::Pending(Arc::new(t)));
            }
            continue;
        }
        let version = versions[i];
        let present: Vec<bool> = n.input.iter().map(|s| !s.is_empty()).collect();
        let lazy = convert::const_only_inputs(op_type, version, &present);
        let mut inputs = Vec::with_capacity(n.input.len());
        let mut konsts = Vec::with_capacity(n.input.len());
        for (k, s) in n.input.iter().enumerate() {
            if s.is_empty() {
                inputs.push(None);
                konsts.push(None);
                continue;
            }
            // Constant parameters (axes, sizes) become attributes; computed ones stay inputs.
            let konst = values.konst(&g, s);
            let skip = lazy.contains(&k) && konst.is_some();
            inputs.push(if skip { None } else { values.outlet(&mut g, s)? });
            konsts.push(konst);
        }
        let used_outputs = n.output.iter().map(|o| !o.is_empty() && used.contains(o.as_str())).collect();
        let mut cx = Cx {
            g: &mut g,
            name: &name,
            op_type,
            opset,
            version,
            attrs: Attrs { list: &n.attribute },
            inputs,
            present,
            konsts,
            n_outputs: n.output.len(),
            used_outputs,
            base_dir,
        };
        let outs = convert::convert(&mut cx)?;
        for (slot, out) in n.output.iter().enumerate() {
            if out.is_empty() {
                continue;
            }
            match outs.get(slot) {
                Some(&o) => {
                    g.set_outlet_name(o, out);
                    values.map.insert(out.clone(), Val::Outlet(o));
                }
                None if used.contains(out.as_str()) => {
                    return Err(FormatError::Unsupported(format!(
                        "node '{name}' ({op_type}): output {slot} ('{out}') is not supported"
                    )))
                }
                None => {}
            }
        }
    }
    for v in &gp.output {
        let name = v.name.as_deref().unwrap_or("");
        let o = values
            .outlet(&mut g, name)?
            .ok_or_else(|| FormatError::malformed("graph", format!("output '{name}' is not produced")))?;
        g.add_output(name, o);
    }
    Ok(g)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_are_read_per_op() {
        let relu = spec::spec("Relu").unwrap();
        assert_eq!(read_version(relu, 7), Ok(6));
        assert_eq!(read_version(relu, 28), Ok(14));
        // Relu 1 had consumed_inputs.
        assert_eq!(read_version(relu, 5).unwrap_err(), "op Relu version 1 (opset 5): not supported");
        let gelu = spec::spec("Gelu").unwrap();
        assert_eq!(read_version(gelu, 17).unwrap_err(), "op Gelu (opset 17): Gelu needs opset 20");
        // A version left out of the list is refused, a later listed one read.
        let partial = OpSpec { op: "Unsqueeze", versions: &[1, 11, 13], inputs: (1, 2), outputs: (1, 1), attrs: &[] };
        assert_eq!(read_version(&partial, 20), Ok(13));
        assert_eq!(read_version(&partial, 23).unwrap_err(), "op Unsqueeze version 23 (opset 23): not supported");
    }
}

//! Executing a plan: values in slots, f32 and byte buffers recycled through the caller's [`State`].

use crate::fast::{self, AttnDims, Rows};
use crate::plan::{Kernel, Plan, Step};
use crate::Result;
use slimnn_ir::{IrError, OpDef};
use slimnn_kernels::{gemm, Epilogue, Par};
use slimnn_tensor::{DType, Tensor};
use std::sync::Arc;

enum Value {
    Const(Arc<Tensor>),
    /// Inputs and reference-evaluator results: dropped when dead.
    Owned(Tensor),
    /// Results of fast kernels, whose buffers came from the pool and go back to it. Only
    /// these are recycled, so the pool holds exactly the buffers one run needs.
    Pooled(Tensor),
}

impl Value {
    fn tensor(&self) -> &Tensor {
        match self {
            Value::Const(t) => t,
            Value::Owned(t) | Value::Pooled(t) => t,
        }
    }
}

/// Free buffers of one element type, reused across steps and runs.
struct Pool<T> {
    /// Free buffers, each initialised up to its capacity and at that length.
    free: Vec<Vec<T>>,
    /// (data pointer, capacity) of the pool's buffers now held by values: they come back
    /// still initialised to their capacity, so they regain full length without a fill.
    lent: Vec<(usize, usize)>,
}

impl<T> Default for Pool<T> {
    fn default() -> Self {
        Pool { free: Vec::new(), lent: Vec::new() }
    }
}

impl<T: Copy + Default> Pool<T> {
    /// A buffer of `len` values: the smallest free one that holds them, else a new one.
    fn take(&mut self, len: usize) -> Vec<T> {
        let best =
            (0..self.free.len()).filter(|&i| self.free[i].capacity() >= len).min_by_key(|&i| self.free[i].capacity());
        let mut v = match best {
            Some(i) => self.free.swap_remove(i),
            None => vec![T::default(); len],
        };
        // Every fast kernel overwrites its whole output, so a reused buffer keeps its stale
        // contents instead of being zero-filled again.
        v.truncate(len);
        self.lent.push((v.as_ptr() as usize, v.capacity()));
        v
    }

    fn give_back(&mut self, mut buf: Vec<T>) {
        let id = (buf.as_ptr() as usize, buf.capacity());
        if let Some(i) = self.lent.iter().position(|&l| l == id) {
            self.lent.swap_remove(i);
            // SAFETY: `take` lent this allocation (same pointer and capacity) initialised to
            // its full capacity; truncation leaves the values in place (`T: Copy` has no drop),
            // so all `capacity` values are still initialised.
            unsafe { buf.set_len(buf.capacity()) };
        } else {
            // Made elsewhere: fill its spare capacity once.
            buf.resize(buf.capacity(), T::default());
        }
        self.free.push(buf);
    }

    fn bytes(&self) -> usize {
        self.free.iter().map(|v| v.capacity() * std::mem::size_of::<T>()).sum()
    }
}

/// One caller's working memory: value slots and pools of f32 and byte buffers reused across
/// steps and runs, so a steady stream of same-shaped runs stops allocating activations.
#[derive(Default)]
pub struct State {
    values: Vec<Option<Value>>,
    pool: Pool<f32>,
    /// 8-bit activations (u8, and i8 as their bit patterns).
    bytes: Pool<u8>,
    live_bytes: usize,
    peak_bytes: usize,
    profile: Option<std::collections::BTreeMap<String, (std::time::Duration, usize)>>,
    /// Profile each step by its node's name rather than summing per kernel kind.
    profile_steps: bool,
    /// One state per group of samples when a batch runs sample by sample.
    shards: Vec<State>,
}

impl State {
    /// Starts timing every step, summed per kernel kind (see [`State::profile`]).
    pub fn enable_profile(&mut self) {
        self.profile = Some(Default::default());
        self.shards.iter_mut().for_each(State::enable_profile);
    }

    /// Starts timing every step on its own, keyed `"<node> <kernel kind>"`.
    pub fn enable_step_profile(&mut self) {
        self.profile = Some(Default::default());
        self.profile_steps = true;
        self.shards.iter_mut().for_each(State::enable_step_profile);
    }

    /// Time and call count per kernel kind (or step) since profiling was enabled, slowest first
    /// (summed over the threads of a batch run sample by sample).
    pub fn profile(&self) -> Vec<(String, std::time::Duration, usize)> {
        let mut all = std::collections::BTreeMap::<String, (std::time::Duration, usize)>::new();
        for p in std::iter::once(self).chain(&self.shards).filter_map(|s| s.profile.as_ref()) {
            for (k, (d, n)) in p {
                let e = all.entry(k.clone()).or_default();
                e.0 += *d;
                e.1 += n;
            }
        }
        let mut v: Vec<_> = all.into_iter().map(|(k, (d, n))| (k, d, n)).collect();
        v.sort_by_key(|e| std::cmp::Reverse(e.1));
        v
    }

    /// Most bytes of activations (f32 and byte buffers from the pools) alive at once so far (per-sample
    /// groups run at once, so theirs add up).
    pub fn peak_activation_bytes(&self) -> usize {
        self.peak_bytes.max(self.shards.iter().map(|s| s.peak_bytes).sum())
    }

    /// Bytes held by the pool and live values (what this state keeps between runs).
    pub fn retained_bytes(&self) -> usize {
        let shards: usize = self.shards.iter().map(State::retained_bytes).sum();
        self.pool.bytes() + self.bytes.bytes() + self.live_bytes + shards
    }

    /// `n` states for groups of samples, profiling as this one does.
    pub(crate) fn shards(&mut self, n: usize) -> &mut [State] {
        while self.shards.len() < n {
            let mut s = State::default();
            if self.profile.is_some() {
                s.profile = Some(Default::default());
                s.profile_steps = self.profile_steps;
            }
            self.shards.push(s);
        }
        &mut self.shards[..n]
    }

    /// Adds a profiled step's time since `started`.
    fn record(&mut self, step: &Step, started: Option<std::time::Instant>) {
        if let (Some(t), Some(p)) = (started, self.profile.as_mut()) {
            let key =
                if self.profile_steps { format!("{} {}", step.name, step.kernel.name()) } else { step.kernel.name() };
            let e = p.entry(key).or_default();
            e.0 += t.elapsed();
            e.1 += 1;
        }
    }

    fn take(&mut self, len: usize) -> Vec<f32> {
        let v = self.pool.take(len);
        self.lend(v.capacity() * 4);
        v
    }

    /// A pooled buffer for `len` 8-bit values.
    fn take_bytes(&mut self, len: usize) -> Vec<u8> {
        let v = self.bytes.take(len);
        self.lend(v.capacity());
        v
    }

    fn lend(&mut self, bytes: usize) {
        self.live_bytes += bytes;
        self.peak_bytes = self.peak_bytes.max(self.live_bytes);
    }

    fn release(&mut self, v: Value) {
        let Value::Pooled(t) = v else { return };
        let freed = match t.dtype() {
            DType::F32 => t.into_vec::<f32>().ok().map(|buf| {
                let n = buf.capacity() * 4;
                self.pool.give_back(buf);
                n
            }),
            DType::U8 => t.into_vec::<u8>().ok().map(|buf| {
                let n = buf.capacity();
                self.bytes.give_back(buf);
                n
            }),
            DType::I8 => t.into_vec::<i8>().ok().map(|buf| {
                let mut buf = std::mem::ManuallyDrop::new(buf);
                // SAFETY: the same allocation reinterpreted: i8 and u8 have one size and
                // alignment.
                let buf = unsafe { Vec::from_raw_parts(buf.as_mut_ptr() as *mut u8, buf.len(), buf.capacity()) };
                let n = buf.capacity();
                self.bytes.give_back(buf);
                n
            }),
            _ => None,
        };
        self.live_bytes = self.live_bytes.saturating_sub(freed.unwrap_or(0));
    }

    fn get(&self, slot: usize) -> Result<&Tensor> {
        self.values
            .get(slot)
            .and_then(|v| v.as_ref())
            .map(Value::tensor)
            .ok_or_else(|| IrError::Graph(format!("value slot {slot} is empty")).into())
    }
}

fn f32s(t: &Tensor) -> Result<&[f32]> {
    Ok(t.as_slice::<f32>()?)
}

pub(crate) fn execute(plan: &Plan, st: &mut State, inputs: Vec<Tensor>, par: bool) -> Result<Vec<Tensor>> {
    st.values.clear();
    // Buffers a failed run left in its values were dropped with them.
    st.pool.lent.clear();
    st.bytes.lent.clear();
    st.values.resize_with(plan.slots, || None);
    for (&s, t) in plan.inputs.iter().zip(inputs) {
        st.values[s] = Some(Value::Owned(t));
    }
    for (s, t) in &plan.consts {
        st.values[*s] = Some(Value::Const(t.clone()));
    }
    let gpar = if par { Par::Current } else { Par::Seq };
    for step in &plan.steps {
        let started = st.profile.is_some().then(std::time::Instant::now);
        if let Kernel::View = step.kernel {
            view(step, st)?;
            st.record(step, started);
            for &s in &step.frees {
                if let Some(v) = st.values[s].take() {
                    st.release(v);
                }
            }
            continue;
        }
        let result = run_step(step, st, par, gpar).map_err(|e| match e {
            crate::RuntimeError::Ir(ir) => crate::RuntimeError::Ir(ir.at_node(&step.name, "step")),
            other => other,
        });
        let outs = result?;
        st.record(step, started);
        // How many of the step's outputs (from the first) came from the pools.
        let pooled = match &step.kernel {
            Kernel::Ref(_) => 0,
            Kernel::Quant(q) if q.f32_output() => usize::MAX,
            Kernel::Quant(q) => usize::from(q.byte_output()),
            _ => usize::MAX,
        };
        for (i, (&s, t)) in step.outputs.iter().zip(outs).enumerate() {
            st.values[s] = Some(if i < pooled { Value::Pooled(t) } else { Value::Owned(t) });
        }
        for &s in &step.frees {
            if let Some(v) = st.values[s].take() {
                st.release(v);
            }
        }
    }
    let mut outputs = Vec::with_capacity(plan.outputs.len());
    for &s in &plan.outputs {
        outputs.push(st.get(s)?.clone());
    }
    for s in 0..st.values.len() {
        if let Some(v) = st.values[s].take() {
            st.release(v);
        }
    }
    Ok(outputs)
}

/// A [`Kernel::View`] step: the input moved under the new shape when this step is its last
/// reader (no copy), else a copy.
fn view(step: &crate::plan::Step, st: &mut State) -> Result<()> {
    let src = step.inputs[0];
    let shape = step.output_shapes[0].clone();
    let movable =
        step.frees.contains(&src) && matches!(st.values.get(src), Some(Some(Value::Owned(_) | Value::Pooled(_))));
    let value = if movable {
        match st.values[src].take() {
            Some(Value::Owned(t)) => Value::Owned(t.into_shape(shape)?),
            Some(Value::Pooled(t)) => Value::Pooled(t.into_shape(shape)?),
            _ => return Err(IrError::Graph(format!("value slot {src} is empty")).into()),
        }
    } else {
        let t = st.get(src)?;
        if t.dtype() == DType::F32 {
            let mut out = st.take(t.len());
            out.copy_from_slice(f32s(st.get(src)?)?);
            Value::Pooled(Tensor::from_vec(shape, out)?)
        } else {
            Value::Owned(t.clone().into_shape(shape)?)
        }
    };
    st.values[step.outputs[0]] = Some(value);
    Ok(())
}

fn run_step(step: &crate::plan::Step, st: &mut State, par: bool, gpar: Par) -> Result<Vec<Tensor>> {
    let shape = step.output_shapes.first().cloned().unwrap_or_default();
    let numel: usize = shape.iter().product();
    match &step.kernel {
        Kernel::Ref(op) => {
            let ins: Vec<&Tensor> = step.inputs.iter().map(|&s| st.get(s)).collect::<Result<_>>()?;
            Ok(op.eval(&ins)?)
        }
        Kernel::Gemm { packed, bias, activation, residual } => {
            let mut out = st.take(numel);
            let a = f32s(st.get(step.inputs[0])?)?;
            let (k, n) = (packed.k(), packed.n());
            let m = a.len() / k.max(1);
            let mut ep = Epilogue::NONE.with_activation(*activation);
            if let Some(b) = bias {
                ep = ep.with_bias(b);
            }
            if *residual {
                ep = ep.with_residual(f32s(st.get(step.inputs[1])?)?, n);
            }
            gemm(m, a, k, packed, &mut out, n, ep, gpar)?;
            Ok(vec![Tensor::from_vec(shape, out)?])
        }
        Kernel::MatMul(k) => {
            let mut out = st.take(numel);
            let ins: Vec<&Tensor> = step.inputs.iter().map(|&s| st.get(s)).collect::<Result<_>>()?;
            k.run(&ins, &mut out, gpar)?;
            Ok(vec![Tensor::from_vec(shape, out)?])
        }
        Kernel::Attention { heads, head_dim, scale, mask_shape, fused_qkv, products } => {
            let mut out = st.take(numel);
            let projections = if *fused_qkv { 1 } else { 3 };
            let p: Vec<&Tensor> = (0..projections).map(|i| st.get(step.inputs[i])).collect::<Result<_>>()?;
            let (q, k) = (p[0], p[projections / 2]);
            let dims = AttnDims {
                batch: q.shape()[0],
                seq_q: q.shape()[1],
                seq_k: k.shape()[1],
                heads: *heads,
                head_dim: *head_dim,
            };
            let mask = match mask_shape {
                Some(ms) => Some((f32s(st.get(step.inputs[projections])?)?, *ms)),
                None => None,
            };
            let hd = heads * head_dim;
            let rows: Vec<Rows> = if *fused_qkv {
                let qkv = f32s(q)?;
                (0..3).map(|i| Rows { data: qkv.get(i * hd..).unwrap_or_default(), ld: 3 * hd }).collect()
            } else {
                p.iter().map(|t| Ok(Rows { data: f32s(t)?, ld: hd })).collect::<Result<_>>()?
            };
            fast::attention(rows[0], rows[1], rows[2], mask, dims, *scale, &mut out, par, *products)?;
            Ok(vec![Tensor::from_vec(shape, out)?])
        }
        Kernel::LayerNorm { scale, bias, epsilon } => {
            let mut out = st.take(numel);
            let n = *shape.last().unwrap_or(&1);
            fast::layer_norm(f32s(st.get(step.inputs[0])?)?, n, scale, bias, *epsilon, &mut out, par)?;
            Ok(vec![Tensor::from_vec(shape, out)?])
        }
        Kernel::LayerNormDyn { epsilon } => {
            let mut out = st.take(numel);
            let n = *shape.last().unwrap_or(&1);
            let bias = match step.inputs.get(2) {
                Some(&b) => Some(f32s(st.get(b)?)?),
                None => None,
            };
            let (x, scale) = (f32s(st.get(step.inputs[0])?)?, f32s(st.get(step.inputs[1])?)?);
            fast::layer_norm_dyn(x, n, scale, bias, *epsilon, &mut out, par)?;
            Ok(vec![Tensor::from_vec(shape, out)?])
        }
        Kernel::View => Err(IrError::Graph("a view step runs in execute".into()).into()),
        Kernel::Transpose(t) => {
            let mut out = st.take(numel);
            fast::transpose(t, f32s(st.get(step.inputs[0])?)?, &mut out, par)?;
            Ok(vec![Tensor::from_vec(shape, out)?])
        }
        Kernel::Unary(f) => {
            let mut out = st.take(numel);
            fast::unary(*f, f32s(st.get(step.inputs[0])?)?, &mut out, par)?;
            Ok(vec![Tensor::from_vec(shape, out)?])
        }
        Kernel::BinaryStrided(op, bc) => {
            let mut out = st.take(numel);
            let (a, b) = (f32s(st.get(step.inputs[0])?)?, f32s(st.get(step.inputs[1])?)?);
            fast::binary_strided(*op, bc, a, b, &mut out, par)?;
            Ok(vec![Tensor::from_vec(shape, out)?])
        }
        Kernel::ActivationGrad(act) => {
            let mut out = st.take(numel);
            let (x, dy) = (f32s(st.get(step.inputs[0])?)?, f32s(st.get(step.inputs[1])?)?);
            fast::activation_grad(*act, x, dy, &mut out, par)?;
            Ok(vec![Tensor::from_vec(shape, out)?])
        }
        Kernel::SoftmaxGrad { log } => {
            let mut out = st.take(numel);
            let n = *shape.last().unwrap_or(&1);
            let (y, dy) = (f32s(st.get(step.inputs[0])?)?, f32s(st.get(step.inputs[1])?)?);
            fast::softmax_grad(y, dy, n, *log, &mut out, par)?;
            Ok(vec![Tensor::from_vec(shape, out)?])
        }
        Kernel::LayerNormGrad { n, epsilon } => {
            let mut dx = st.take(numel);
            let mut dscale = st.take(*n);
            let mut dbias = st.take(*n);
            let x = f32s(st.get(step.inputs[0])?)?;
            let scale = f32s(st.get(step.inputs[1])?)?;
            let dy = f32s(st.get(step.inputs[2])?)?;
            fast::layer_norm_grad(x, scale, dy, *n, *epsilon, &mut dx, &mut dscale, &mut dbias, par)?;
            let shapes = &step.output_shapes;
            Ok(vec![
                Tensor::from_vec(shape, dx)?,
                Tensor::from_vec(shapes[1].clone(), dscale)?,
                Tensor::from_vec(shapes[2].clone(), dbias)?,
            ])
        }
        Kernel::GatherGrad { inner } => {
            let mut out = st.take(numel);
            let idx = st.get(step.inputs[1])?.as_slice::<i64>()?;
            fast::gather_grad(idx, f32s(st.get(step.inputs[2])?)?, *inner, &mut out, par)?;
            Ok(vec![Tensor::from_vec(shape, out)?])
        }
        Kernel::EmbeddingDyn => {
            let mut out = st.take(numel);
            let table = st.get(step.inputs[0])?;
            let idx = st.get(step.inputs[1])?.as_slice::<i64>()?;
            let (rows, n) = (table.shape()[0], table.shape()[1]);
            fast::embedding(f32s(table)?, rows, n, idx, &mut out)?;
            Ok(vec![Tensor::from_vec(shape, out)?])
        }
        Kernel::Softmax => {
            let mut out = st.take(numel);
            let n = *shape.last().unwrap_or(&1);
            fast::softmax(f32s(st.get(step.inputs[0])?)?, n, &mut out, par)?;
            Ok(vec![Tensor::from_vec(shape, out)?])
        }
        Kernel::Activation(act) => {
            let mut out = st.take(numel);
            fast::activation(f32s(st.get(step.inputs[0])?)?, *act, &mut out, par)?;
            Ok(vec![Tensor::from_vec(shape, out)?])
        }
        Kernel::Binary(op, bc) => {
            let mut out = st.take(numel);
            let (a, b) = (f32s(st.get(step.inputs[0])?)?, f32s(st.get(step.inputs[1])?)?);
            fast::binary(*op, *bc, a, b, &mut out, par)?;
            Ok(vec![Tensor::from_vec(shape, out)?])
        }
        Kernel::ReduceSum { len, inner } => {
            let mut out = st.take(numel);
            fast::reduce_sum(f32s(st.get(step.inputs[0])?)?, *len, *inner, &mut out)?;
            Ok(vec![Tensor::from_vec(shape, out)?])
        }
        Kernel::Embedding { table } => {
            let mut out = st.take(numel);
            let idx = st.get(step.inputs[1])?.as_slice::<i64>()?;
            let (rows, n) = (table.shape()[0], table.shape()[1]);
            fast::embedding(f32s(table)?, rows, n, idx, &mut out)?;
            Ok(vec![Tensor::from_vec(shape, out)?])
        }
        Kernel::Conv(k) => {
            let mut out = st.take(numel);
            let residual = match step.inputs.get(1) {
                Some(&s) => Some(f32s(st.get(s)?)?),
                None => None,
            };
            k.run(f32s(st.get(step.inputs[0])?)?, residual, &mut out, par)?;
            Ok(vec![Tensor::from_vec(shape, out)?])
        }
        Kernel::Pool(k) => {
            let mut out = st.take(numel);
            let x = f32s(st.get(step.inputs[0])?)?;
            let dy = match step.inputs.get(1) {
                Some(&s) => Some(f32s(st.get(s)?)?),
                None => None,
            };
            k.run(x, dy, &mut out, par)?;
            Ok(vec![Tensor::from_vec(shape, out)?])
        }
        Kernel::ConvTrain(k) => {
            let mut out = st.take(numel);
            let ins: Vec<&[f32]> = step.inputs.iter().map(|&s| f32s(st.get(s)?)).collect::<Result<_>>()?;
            k.run(&ins, &mut out, par)?;
            Ok(vec![Tensor::from_vec(shape, out)?])
        }
        Kernel::Quant(q) => {
            let out = if q.f32_output() { st.take(numel) } else { Vec::new() };
            let bytes = if q.byte_output() { st.take_bytes(numel) } else { Vec::new() };
            let ins: Vec<&Tensor> = step.inputs.iter().map(|&s| st.get(s)).collect::<Result<_>>()?;
            q.run(&ins, &shape, out, bytes, par)
        }
        Kernel::BlockQ(k) => {
            let mut out = st.take(numel);
            let ins: Vec<&Tensor> = step.inputs.iter().map(|&s| st.get(s)).collect::<Result<_>>()?;
            k.run(&ins, &mut out, par)?;
            Ok(vec![Tensor::from_vec(shape, out)?])
        }
        Kernel::GlobalAveragePool { channels_last } => {
            let mut out = st.take(numel);
            let x = f32s(st.get(step.inputs[0])?)?;
            if *channels_last {
                crate::conv::global_average_pool_nhwc(x, shape.get(1).copied().unwrap_or(0), &mut out)?;
            } else {
                crate::conv::global_average_pool(x, x.len() / numel.max(1), &mut out)?;
            }
            Ok(vec![Tensor::from_vec(shape, out)?])
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{State, Value};
    use slimnn_tensor::Tensor;

    fn give_back(st: &mut State, v: Vec<f32>) {
        let n = v.len();
        st.release(Value::Pooled(Tensor::from_vec(vec![n], v).unwrap()));
    }

    #[test]
    fn a_buffer_lent_short_regrows_without_a_refill() {
        let mut st = State::default();
        let mut v = st.take(64);
        v.iter_mut().enumerate().for_each(|(i, x)| *x = i as f32);
        let ptr = v.as_ptr();
        give_back(&mut st, v);
        // Lent for fewer values, then for all of them again: same allocation, and the values
        // past the short length are the ones written first (not zeroed).
        let short = st.take(16);
        assert_eq!((short.as_ptr(), short.len()), (ptr, 16));
        give_back(&mut st, short);
        let full = st.take(64);
        assert_eq!(full.as_ptr(), ptr);
        assert_eq!(full[63], 63.0);
        give_back(&mut st, full);
        assert!(st.pool.lent.is_empty());
    }

    #[test]
    fn byte_buffers_come_back_to_their_pool_whatever_their_sign() {
        let mut st = State::default();
        let v = st.take_bytes(100);
        let ptr = v.as_ptr();
        assert_eq!(st.peak_activation_bytes(), 100);
        // Released as an i8 tensor (a signed output's bits), it comes back as bytes.
        let mut v = std::mem::ManuallyDrop::new(v);
        // SAFETY: the same allocation reinterpreted; i8 and u8 share size and alignment.
        let signed = unsafe { Vec::from_raw_parts(v.as_mut_ptr() as *mut i8, v.len(), v.capacity()) };
        st.release(Value::Pooled(Tensor::from_vec(vec![100], signed).unwrap()));
        assert_eq!(st.retained_bytes(), 100);
        let again = st.take_bytes(60);
        assert_eq!((again.as_ptr(), again.len()), (ptr, 60));
        assert!(st.pool.free.is_empty(), "no f32 buffer was involved");
    }

    #[test]
    fn a_buffer_made_elsewhere_is_filled_before_reuse() {
        let mut st = State::default();
        let mut v = Vec::with_capacity(32);
        v.extend_from_slice(&[1.0f32; 8]);
        give_back(&mut st, v);
        let w = st.take(32);
        assert_eq!(w.len(), 32);
        assert!(w[..8].iter().all(|&x| x == 1.0) && w[8..].iter().all(|&x| x == 0.0));
    }
}

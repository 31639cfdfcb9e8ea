//! Matrix products.

use super::util::{broadcast_dims, expect_inputs, next_index, show_dims};
use super::OpDef;
use crate::{op_bail, Fact, IrError, IrResult};
use slimnn_tensor::{broadcast_shapes, checked_numel, strides_of, DType, Dim, Tensor};
use std::borrow::Cow;

/// Numpy `matmul`: batched over leading dims with broadcasting; 1-d operands are promoted
/// and the added dim removed again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MatMul;

/// `alpha * op(A) @ op(B) + beta * C` on 2-d operands; `C` (optional third input)
/// broadcasts to the output.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Gemm {
    pub alpha: f32,
    pub beta: f32,
    pub trans_a: bool,
    pub trans_b: bool,
}

/// Depth of a block of `b` kept in cache.
const KC: usize = 128;
/// Width of a block of `b` (and of the accumulator row segment).
const NC: usize = 512;

/// `acc[m×n] += a[m×k] · b[k×n]` for row-major contiguous operands, accumulated in f64.
///
/// Loops run i-k-j over `KC × NC` blocks of `b` (256 KiB of f32), so a block stays in cache
/// while every row of `a` streams past it; the innermost loop is contiguous in `b` and `acc`
/// and takes four rows of `b` at a time to cut accumulator traffic.
fn gemm_f64<T: Copy + Into<f64>>(m: usize, k: usize, n: usize, a: &[T], b: &[T], acc: &mut [f64]) {
    for j0 in (0..n).step_by(NC) {
        let j1 = (j0 + NC).min(n);
        for k0 in (0..k).step_by(KC) {
            let k1 = (k0 + KC).min(k);
            for i in 0..m {
                let arow = &a[i * k..(i + 1) * k];
                let crow = &mut acc[i * n + j0..i * n + j1];
                let brow = |kk: usize| &b[kk * n + j0..kk * n + j1];
                let mut kk = k0;
                while kk + 4 <= k1 {
                    let (a0, a1, a2, a3) =
                        (arow[kk].into(), arow[kk + 1].into(), arow[kk + 2].into(), arow[kk + 3].into());
                    let rows = brow(kk).iter().zip(brow(kk + 1)).zip(brow(kk + 2)).zip(brow(kk + 3));
                    for (c, (((&x0, &x1), &x2), &x3)) in crow.iter_mut().zip(rows) {
                        *c += a0 * x0.into() + a1 * x1.into() + a2 * x2.into() + a3 * x3.into();
                    }
                    kk += 4;
                }
                for (kk, &av) in arow[..k1].iter().enumerate().skip(kk) {
                    let av: f64 = av.into();
                    for (c, &x) in crow.iter_mut().zip(brow(kk)) {
                        *c += av * x.into();
                    }
                }
            }
        }
    }
}

/// Integer version of [`gemm_f64`]: wrapping i64 arithmetic, which is exact modulo 2^32 for
/// i32 results once cast back.
fn gemm_i64(m: usize, k: usize, n: usize, a: &[i64], b: &[i64], acc: &mut [i64]) {
    for j0 in (0..n).step_by(NC) {
        let j1 = (j0 + NC).min(n);
        for k0 in (0..k).step_by(KC) {
            let k1 = (k0 + KC).min(k);
            for i in 0..m {
                let crow = &mut acc[i * n + j0..i * n + j1];
                for kk in k0..k1 {
                    let av = a[i * k + kk];
                    for (c, &x) in crow.iter_mut().zip(&b[kk * n + j0..kk * n + j1]) {
                        *c = c.wrapping_add(av.wrapping_mul(x));
                    }
                }
            }
        }
    }
}

/// Operand values in the precision the kernels take: f32 as is, f64 and f16/bf16 (widened)
/// as f64, integers as i64.
enum Operand<'a> {
    F32(Cow<'a, [f32]>),
    F64(Cow<'a, [f64]>),
    I64(Vec<i64>),
}

impl<'a> Operand<'a> {
    fn of(t: &'a Tensor) -> IrResult<Operand<'a>> {
        Ok(match t.dtype() {
            DType::F32 => Operand::F32(Cow::Borrowed(t.as_slice::<f32>()?)),
            DType::F64 => Operand::F64(Cow::Borrowed(t.as_slice::<f64>()?)),
            d if d.is_float() => Operand::F64(Cow::Owned(t.to_f64_vec())),
            _ => Operand::I64(t.to_i64_vec()?),
        })
    }

    /// The `rows × cols` matrix transposed into a new `cols × rows` one.
    fn transposed(self, rows: usize, cols: usize) -> Operand<'a> {
        fn tr<T: Copy>(x: &[T], rows: usize, cols: usize) -> Vec<T> {
            (0..cols).flat_map(|c| (0..rows).map(move |r| x[r * cols + c])).collect()
        }
        match self {
            Operand::F32(x) => Operand::F32(Cow::Owned(tr(&x, rows, cols))),
            Operand::F64(x) => Operand::F64(Cow::Owned(tr(&x, rows, cols))),
            Operand::I64(x) => Operand::I64(tr(&x, rows, cols)),
        }
    }
}

/// Products computed before the epilogue: f64 for float dtypes, i64 for integers.
enum Acc {
    F64(Vec<f64>),
    I64(Vec<i64>),
}

/// A product kernel: `(m, k, n, a, b, acc)`.
type Kernel<T, A> = fn(usize, usize, usize, &[T], &[T], &mut [A]);

/// `out[p] = a[pairs[p].0] · b[pairs[p].1]` for `m×k` matrices of `a` and `k×n` of `b`.
fn batched((a, b): (&Operand, &Operand), (m, k, n): (usize, usize, usize), pairs: &[(usize, usize)]) -> IrResult<Acc> {
    let total = pairs.len() * m * n;
    checked_numel(&[total], DType::F64)?;
    // When every item reads the same `b` and consecutive `a`s, one tall product does them all
    // (a batch of sequences times a weight matrix).
    let tall = pairs.iter().enumerate().all(|(p, &(ia, ib))| ia == p && ib == 0);
    fn run<T: Copy, A: Copy + Default>(
        (a, b): (&[T], &[T]),
        (m, k, n): (usize, usize, usize),
        pairs: &[(usize, usize)],
        tall: bool,
        kernel: Kernel<T, A>,
    ) -> Vec<A> {
        let mut acc = vec![A::default(); pairs.len() * m * n];
        if pairs.is_empty() {
            return acc;
        }
        if tall {
            kernel(pairs.len() * m, k, n, &a[..pairs.len() * m * k], &b[..k * n], &mut acc);
        } else {
            for (out, &(ia, ib)) in acc.chunks_mut((m * n).max(1)).zip(pairs) {
                kernel(m, k, n, &a[ia * m * k..(ia + 1) * m * k], &b[ib * k * n..(ib + 1) * k * n], out);
            }
        }
        acc
    }
    let dims = (m, k, n);
    Ok(match (a, b) {
        (Operand::F32(a), Operand::F32(b)) => Acc::F64(run((a, b), dims, pairs, tall, gemm_f64::<f32>)),
        (Operand::F64(a), Operand::F64(b)) => Acc::F64(run((a, b), dims, pairs, tall, gemm_f64::<f64>)),
        (Operand::I64(a), Operand::I64(b)) => Acc::I64(run((a, b), dims, pairs, tall, gemm_i64)),
        _ => return Err(IrError::op("MatMul", "operands of different kinds")),
    })
}

/// ONNX defines MatMul and Gemm for floats and 32/64-bit integers.
fn check_dtypes(op: &'static str, dts: &[DType]) -> IrResult<DType> {
    let dt = dts[0];
    if dts.iter().any(|&d| d != dt) {
        let names: Vec<String> = dts.iter().map(|d| d.to_string()).collect();
        op_bail!(op, "input dtypes differ: {}", names.join(", "));
    }
    if !(dt.is_float() || matches!(dt, DType::I32 | DType::I64)) {
        op_bail!(op, "not defined for {dt} inputs");
    }
    Ok(dt)
}

/// Fails when two dims are known and differ.
fn check_same(op: &'static str, what: &str, a: &Dim, b: &Dim) -> IrResult<()> {
    if let (Dim::Known(x), Dim::Known(y)) = (a, b) {
        if x != y {
            op_bail!(op, "{what} mismatch: {x} vs {y}");
        }
    }
    Ok(())
}

impl OpDef for MatMul {
    fn name(&self) -> &'static str {
        "MatMul"
    }

    fn output_facts(&self, inputs: &[&Fact]) -> IrResult<Vec<Fact>> {
        expect_inputs("MatMul", inputs, 2, 2)?;
        let (a, b) = (inputs[0], inputs[1]);
        let dt = check_dtypes("MatMul", &[a.dtype, b.dtype])?;
        if a.rank() == 0 || b.rank() == 0 {
            op_bail!("MatMul", "operands must have rank >= 1, got {} and {}", show_dims(&a.shape), show_dims(&b.shape));
        }
        let sa = if a.rank() == 1 { vec![Dim::Known(1), a.shape[0].clone()] } else { a.shape.clone() };
        let sb = if b.rank() == 1 { vec![b.shape[0].clone(), Dim::Known(1)] } else { b.shape.clone() };
        let (ra, rb) = (sa.len(), sb.len());
        let what = format!("inner dimension of {} @ {}", show_dims(&a.shape), show_dims(&b.shape));
        check_same("MatMul", &what, &sa[ra - 1], &sb[rb - 2])?;
        let mut shape = broadcast_dims("MatMul", &sa[..ra - 2], &sb[..rb - 2])?;
        if a.rank() >= 2 {
            shape.push(sa[ra - 2].clone());
        }
        if b.rank() >= 2 {
            shape.push(sb[rb - 1].clone());
        }
        Ok(vec![Fact::new(dt, shape)])
    }

    fn eval(&self, inputs: &[&Tensor]) -> IrResult<Vec<Tensor>> {
        expect_inputs("MatMul", inputs, 2, 2)?;
        let (a, b) = (inputs[0], inputs[1]);
        let dt = check_dtypes("MatMul", &[a.dtype(), b.dtype()])?;
        if a.rank() == 0 || b.rank() == 0 {
            op_bail!("MatMul", "operands must have rank >= 1, got shapes {:?} and {:?}", a.shape(), b.shape());
        }
        let sa = if a.rank() == 1 { vec![1, a.shape()[0]] } else { a.shape().to_vec() };
        let sb = if b.rank() == 1 { vec![b.shape()[0], 1] } else { b.shape().to_vec() };
        let (ra, rb) = (sa.len(), sb.len());
        let (m, k, n) = (sa[ra - 2], sa[ra - 1], sb[rb - 1]);
        if sb[rb - 2] != k {
            op_bail!("MatMul", "inner dimension mismatch: {:?} @ {:?}", a.shape(), b.shape());
        }
        let (ba, bb) = (&sa[..ra - 2], &sb[..rb - 2]);
        let batch = broadcast_shapes(ba, bb).map_err(|_| {
            IrError::op("MatMul", format!("cannot broadcast batch dims of {:?} and {:?}", a.shape(), b.shape()))
        })?;
        let pairs = batch_pairs(ba, bb, &batch);
        let mut shape = batch;
        if a.rank() >= 2 {
            shape.push(m);
        }
        if b.rank() >= 2 {
            shape.push(n);
        }
        let y = match batched((&Operand::of(a)?, &Operand::of(b)?), (m, k, n), &pairs)? {
            Acc::F64(v) => Tensor::from_f64s(dt, shape, &v)?,
            Acc::I64(v) => Tensor::from_i64s(dt, shape, &v)?,
        };
        Ok(vec![y])
    }
}

/// For each output batch index (row-major over `out`), the matrix indices read from `a`
/// and `b`, whose batch shapes broadcast to `out`.
fn batch_pairs(a: &[usize], b: &[usize], out: &[usize]) -> Vec<(usize, usize)> {
    let r = out.len();
    let bstrides = |s: &[usize]| -> Vec<usize> {
        let st = strides_of(s);
        (0..r)
            .map(|ax| match ax.checked_sub(r - s.len()) {
                Some(i) if s[i] != 1 => st[i],
                _ => 0,
            })
            .collect()
    };
    let (sa, sb) = (bstrides(a), bstrides(b));
    if out.contains(&0) {
        return vec![];
    }
    let mut idx = vec![0; r];
    let mut pairs = vec![];
    loop {
        let at = |st: &[usize]| idx.iter().zip(st).map(|(i, s)| i * s).sum::<usize>();
        pairs.push((at(&sa), at(&sb)));
        if !next_index(&mut idx, out) {
            break;
        }
    }
    pairs
}

impl Gemm {
    fn check_attrs(&self) -> IrResult<()> {
        if !self.alpha.is_finite() || !self.beta.is_finite() {
            op_bail!("Gemm", "alpha and beta must be finite, got {} and {}", self.alpha, self.beta);
        }
        Ok(())
    }
}

impl OpDef for Gemm {
    fn name(&self) -> &'static str {
        "Gemm"
    }

    fn output_facts(&self, inputs: &[&Fact]) -> IrResult<Vec<Fact>> {
        expect_inputs("Gemm", inputs, 2, 3)?;
        self.check_attrs()?;
        let dts: Vec<DType> = inputs.iter().map(|f| f.dtype).collect();
        let dt = check_dtypes("Gemm", &dts)?;
        let (a, b) = (inputs[0], inputs[1]);
        if a.rank() != 2 || b.rank() != 2 {
            op_bail!("Gemm", "A and B must be 2-d, got {} and {}", show_dims(&a.shape), show_dims(&b.shape));
        }
        let (m, ka) = if self.trans_a { (&a.shape[1], &a.shape[0]) } else { (&a.shape[0], &a.shape[1]) };
        let (kb, n) = if self.trans_b { (&b.shape[1], &b.shape[0]) } else { (&b.shape[0], &b.shape[1]) };
        check_same("Gemm", "inner dimension", ka, kb)?;
        if let Some(c) = inputs.get(2) {
            if c.rank() > 2 {
                op_bail!("Gemm", "C must have rank <= 2, got {}", show_dims(&c.shape));
            }
            let pad = 2 - c.rank();
            for (d, out) in c.shape.iter().zip([m, n].into_iter().skip(pad)) {
                if d != &Dim::Known(1) {
                    check_same("Gemm", "C does not broadcast to the output:", d, out)?;
                }
            }
        }
        Ok(vec![Fact::new(dt, vec![m.clone(), n.clone()])])
    }

    fn eval(&self, inputs: &[&Tensor]) -> IrResult<Vec<Tensor>> {
        expect_inputs("Gemm", inputs, 2, 3)?;
        self.check_attrs()?;
        let dts: Vec<DType> = inputs.iter().map(|t| t.dtype()).collect();
        let dt = check_dtypes("Gemm", &dts)?;
        let (a, b) = (inputs[0], inputs[1]);
        if a.rank() != 2 || b.rank() != 2 {
            op_bail!("Gemm", "A and B must be 2-d, got shapes {:?} and {:?}", a.shape(), b.shape());
        }
        let (ar, ac) = (a.shape()[0], a.shape()[1]);
        let (br, bc) = (b.shape()[0], b.shape()[1]);
        let (m, k) = if self.trans_a { (ac, ar) } else { (ar, ac) };
        let (kb, n) = if self.trans_b { (bc, br) } else { (br, bc) };
        if k != kb {
            op_bail!(
                "Gemm",
                "inner dimension mismatch: op(A) is {m}x{k}, op(B) is {kb}x{n} (shapes {:?}, {:?})",
                a.shape(),
                b.shape()
            );
        }
        // C as [cm, cn] with cm in {1, m} and cn in {1, n}.
        let c = match inputs.get(2) {
            None => None,
            Some(c) => {
                let (cm, cn) = match *c.shape() {
                    [] => (1, 1),
                    [x] => (1, x),
                    [x, y] => (x, y),
                    _ => op_bail!("Gemm", "C must have rank <= 2, got shape {:?}", c.shape()),
                };
                if (cm != 1 && cm != m) || (cn != 1 && cn != n) {
                    op_bail!("Gemm", "C of shape {:?} does not broadcast to [{m}, {n}]", c.shape());
                }
                Some((*c, cm, cn))
            }
        };
        let c_at =
            |i: usize, j: usize, cm: usize, cn: usize| (if cm == 1 { 0 } else { i }) * cn + if cn == 1 { 0 } else { j };
        let mut oa = Operand::of(a)?;
        if self.trans_a {
            oa = oa.transposed(ar, ac);
        }
        let mut ob = Operand::of(b)?;
        if self.trans_b {
            ob = ob.transposed(br, bc);
        }
        let (alpha, beta) = (f64::from(self.alpha), f64::from(self.beta));
        let shape = vec![m, n];
        let y = match batched((&oa, &ob), (m, k, n), &[(0, 0)])? {
            Acc::F64(mut v) => {
                let cv = c.map(|(c, cm, cn)| (c.to_f64_vec(), cm, cn));
                for (idx, y) in v.iter_mut().enumerate() {
                    *y *= alpha;
                    if let Some((cv, cm, cn)) = &cv {
                        *y += beta * cv[c_at(idx / n, idx % n, *cm, *cn)];
                    }
                }
                Tensor::from_f64s(dt, shape, &v)?
            }
            Acc::I64(mut v) => {
                let cv = match c {
                    Some((c, cm, cn)) => Some((c.to_i64_vec()?, cm, cn)),
                    None => None,
                };
                // Integer results stay exact (wrapping) unless alpha or beta actually scale.
                let exact = alpha == 1.0 && (cv.is_none() || beta == 0.0 || beta == 1.0);
                if exact {
                    if let (Some((cv, cm, cn)), true) = (&cv, beta == 1.0) {
                        for (idx, y) in v.iter_mut().enumerate() {
                            *y = y.wrapping_add(cv[c_at(idx / n, idx % n, *cm, *cn)]);
                        }
                    }
                    Tensor::from_i64s(dt, shape, &v)?
                } else {
                    let f: Vec<f64> = v
                        .iter()
                        .enumerate()
                        .map(|(idx, &y)| {
                            let c = cv.as_ref().map_or(0.0, |(cv, cm, cn)| cv[c_at(idx / n, idx % n, *cm, *cn)] as f64);
                            alpha * y as f64 + beta * c
                        })
                        .collect();
                    Tensor::from_f64s(dt, shape, &f)?
                }
            }
        };
        Ok(vec![y])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn t<T: crate::ops::elementwise::Elem>(shape: &[usize], v: Vec<T>) -> Tensor {
        T::tensor(shape.to_vec(), v).unwrap()
    }

    fn run(op: impl OpDef, inputs: &[&Tensor]) -> Tensor {
        op.eval(inputs).unwrap().remove(0)
    }

    fn mat_a() -> Tensor {
        t(&[2, 3], vec![1f32, 2.0, 3.0, 4.0, 5.0, 6.0])
    }

    fn mat_b() -> Tensor {
        t(&[3, 2], vec![7f32, 8.0, 9.0, 10.0, 11.0, 12.0])
    }

    #[test]
    fn matmul_2d_and_vectors() {
        let y = run(MatMul, &[&mat_a(), &mat_b()]);
        assert_eq!(y.shape(), &[2, 2]);
        assert_eq!(y.as_slice::<f32>().unwrap(), &[58.0, 64.0, 139.0, 154.0]);
        let v = t(&[3], vec![1f32, 2.0, 3.0]);
        let y = run(MatMul, &[&v, &mat_b()]);
        assert_eq!((y.shape(), y.as_slice::<f32>().unwrap()), (&[2][..], &[58.0, 64.0][..]));
        let ones = t(&[3], vec![1f32; 3]);
        let y = run(MatMul, &[&mat_a(), &ones]);
        assert_eq!((y.shape(), y.as_slice::<f32>().unwrap()), (&[2][..], &[6.0, 15.0][..]));
        let y = run(MatMul, &[&v, &v]);
        assert_eq!((y.shape(), y.as_slice::<f32>().unwrap()), (&[][..], &[14.0][..]));
    }

    #[test]
    fn matmul_batches_broadcast() {
        // [2,1,2,3] @ [3,3,2] -> [2,3,2,2]; item (1,2) is a[1] @ b[2].
        let a = t(&[2, 1, 2, 3], (0..12).map(|v| v as f64).collect());
        let b = t(&[3, 3, 2], (0..18).map(|v| v as f64).collect());
        let y = run(MatMul, &[&a, &b]);
        assert_eq!(y.shape(), &[2, 3, 2, 2]);
        // a[1] = [[6,7,8],[9,10,11]], b[2] = [[12,13],[14,15],[16,17]]
        let item = &y.as_slice::<f64>().unwrap()[5 * 4..6 * 4];
        assert_eq!(
            item,
            &[
                6. * 12. + 7. * 14. + 8. * 16.,
                6. * 13. + 7. * 15. + 8. * 17.,
                9. * 12. + 10. * 14. + 11. * 16.,
                9. * 13. + 10. * 15. + 11. * 17.
            ]
        );
        // A 1-d operand against a batch.
        let y = run(MatMul, &[&t(&[3], vec![1f64, 0.0, 0.0]), &b]);
        assert_eq!(y.shape(), &[3, 2]);
        assert_eq!(y.as_slice::<f64>().unwrap(), &[0.0, 1.0, 6.0, 7.0, 12.0, 13.0]);
    }

    #[test]
    fn matmul_dtypes() {
        let big = t(&[1, 1], vec![65536i32]);
        let y = run(MatMul, &[&big, &big]);
        assert_eq!(y.as_slice::<i32>().unwrap(), &[0]); // 2^32 wraps in i32
        let y = run(MatMul, &[&t(&[1, 2], vec![3i64, -4]), &t(&[2, 1], vec![5i64, 6])]);
        assert_eq!(y.as_slice::<i64>().unwrap(), &[-9]);
        let h = |v: &[f32]| v.iter().map(|&x| slimnn_tensor::f16::from_f32(x)).collect::<Vec<_>>();
        let y = run(MatMul, &[&t(&[1, 2], h(&[1.5, 2.0])), &t(&[2, 1], h(&[2.0, 0.25]))]);
        assert_eq!(y.dtype(), DType::F16);
        assert_eq!(y.to_f64_vec(), [3.5]);
        // K = 0 gives zeros.
        let y = run(MatMul, &[&t(&[2, 0], Vec::<f32>::new()), &t(&[0, 3], Vec::<f32>::new())]);
        assert_eq!(y.as_slice::<f32>().unwrap(), &[0.0; 6]);
    }

    #[test]
    fn matmul_errors_and_facts() {
        let e = MatMul.eval(&[&mat_a(), &mat_a()]).unwrap_err();
        assert!(e.to_string().contains("inner dimension"), "{e}");
        assert!(MatMul.eval(&[&t(&[], vec![1f32]), &mat_b()]).is_err());
        assert!(MatMul.eval(&[&mat_a(), &t(&[3, 2], vec![0f64; 6])]).is_err());
        assert!(MatMul.eval(&[&t(&[1, 1], vec![1i8]), &t(&[1, 1], vec![1i8])]).is_err());
        assert!(MatMul.eval(&[&t(&[2, 1, 1], vec![0f32; 2]), &t(&[3, 1, 1], vec![0f32; 3])]).is_err());
        assert!(MatMul.eval(&[&mat_a()]).is_err());

        let x = Fact::new(DType::F32, vec![Dim::sym("batch"), Dim::sym("seq"), Dim::Known(384)]);
        let w = Fact::known(DType::F32, &[384, 1536]);
        assert_eq!(
            MatMul.output_facts(&[&x, &w]).unwrap(),
            vec![Fact::new(DType::F32, vec![Dim::sym("batch"), Dim::sym("seq"), Dim::Known(1536)])]
        );
        let v = Fact::known(DType::F32, &[384]);
        assert_eq!(MatMul.output_facts(&[&x, &v]).unwrap()[0].shape, vec![Dim::sym("batch"), Dim::sym("seq")]);
        assert_eq!(MatMul.output_facts(&[&v, &v]).unwrap()[0].shape, vec![]);
        assert!(MatMul.output_facts(&[&x, &Fact::known(DType::F32, &[383, 2])]).is_err());
        assert!(MatMul.output_facts(&[&x, &Fact::known(DType::F64, &[384, 2])]).is_err());
        assert!(MatMul.output_facts(&[&x, &Fact::known(DType::F32, &[])]).is_err());
        let q = Fact::new(DType::F32, vec![Dim::Known(2), Dim::Unknown, Dim::Known(4)]);
        let k = Fact::known(DType::F32, &[3, 4, 5]);
        assert!(MatMul.output_facts(&[&q, &k]).is_err());
    }

    /// Crosses the KC and NC block edges with a depth that is not a multiple of four.
    #[test]
    fn matmul_block_edges() {
        let (m, k, n) = (3, 2 * KC + 5, 2 * NC + 7);
        let a: Vec<f64> = (0..m * k).map(|i| ((i * 7) % 13) as f64 - 6.0).collect();
        let b: Vec<f64> = (0..k * n).map(|i| ((i * 5) % 11) as f64 - 5.0).collect();
        let y = run(MatMul, &[&t(&[m, k], a.clone()), &t(&[k, n], b.clone())]);
        let y = y.as_slice::<f64>().unwrap();
        for i in 0..m {
            for j in 0..n {
                let want: f64 = (0..k).map(|kk| a[i * k + kk] * b[kk * n + j]).sum();
                assert_eq!(y[i * n + j], want, "({i},{j})");
            }
        }
    }

    #[test]
    fn gemm_flags_alpha_beta_c() {
        let a = t(&[2, 2], vec![1f32, 2.0, 3.0, 4.0]);
        let b = t(&[2, 2], vec![5f32, 6.0, 7.0, 8.0]);
        let g = |trans_a, trans_b, alpha, beta| Gemm { alpha, beta, trans_a, trans_b };
        let vals = |y: Tensor| y.as_slice::<f32>().unwrap().to_vec();
        assert_eq!(vals(run(g(false, false, 1.0, 1.0), &[&a, &b])), [19.0, 22.0, 43.0, 50.0]);
        assert_eq!(vals(run(g(true, false, 1.0, 1.0), &[&a, &b])), [26.0, 30.0, 38.0, 44.0]);
        assert_eq!(vals(run(g(false, true, 1.0, 1.0), &[&a, &b])), [17.0, 23.0, 39.0, 53.0]);
        let c_row = t(&[2], vec![10f32, 20.0]);
        assert_eq!(vals(run(g(false, false, 2.0, 0.5), &[&a, &b, &c_row])), [43.0, 54.0, 91.0, 110.0]);
        let c_col = t(&[2, 1], vec![1f32, 2.0]);
        assert_eq!(vals(run(g(false, false, 1.0, 1.0), &[&a, &b, &c_col])), [20.0, 23.0, 45.0, 52.0]);
        let c_one = t(&[], vec![100f32]);
        assert_eq!(vals(run(g(false, false, 1.0, -1.0), &[&a, &b, &c_one])), [-81.0, -78.0, -57.0, -50.0]);
        // Non-square with both transposes: A^T is 2x3, B^T is 3x1.
        let a = t(&[3, 2], vec![1f64, 2.0, 3.0, 4.0, 5.0, 6.0]);
        let b = t(&[1, 3], vec![1f64, 1.0, 1.0]);
        let y = run(g(true, true, 1.0, 1.0), &[&a, &b]);
        assert_eq!((y.shape(), y.as_slice::<f64>().unwrap()), (&[2, 1][..], &[9.0, 12.0][..]));
    }

    #[test]
    fn gemm_integers() {
        let a = t(&[2, 2], vec![1i32, 2, 3, 4]);
        let b = t(&[2, 2], vec![5i32, 6, 7, 8]);
        let c = t(&[2], vec![1i32, -1]);
        let g = |alpha, beta| Gemm { alpha, beta, trans_a: false, trans_b: false };
        let y = run(g(1.0, 1.0), &[&a, &b, &c]);
        assert_eq!(y.as_slice::<i32>().unwrap(), &[20, 21, 44, 49]);
        let y = run(g(0.5, 0.0), &[&a, &b, &c]);
        assert_eq!(y.as_slice::<i32>().unwrap(), &[9, 11, 21, 25]);
    }

    #[test]
    fn gemm_errors_and_facts() {
        let g = Gemm { alpha: 1.0, beta: 1.0, trans_a: false, trans_b: true };
        let a = Fact::new(DType::F32, vec![Dim::sym("n"), Dim::Known(384)]);
        let w = Fact::known(DType::F32, &[10, 384]);
        let c = Fact::known(DType::F32, &[10]);
        assert_eq!(
            g.output_facts(&[&a, &w, &c]).unwrap(),
            vec![Fact::new(DType::F32, vec![Dim::sym("n"), Dim::Known(10)])]
        );
        assert!(g.output_facts(&[&a, &w, &Fact::known(DType::F32, &[9])]).is_err());
        assert!(g.output_facts(&[&a, &w, &Fact::known(DType::F32, &[1, 1, 10])]).is_err());
        assert!(g.output_facts(&[&a, &Fact::known(DType::F32, &[10, 383])]).is_err());
        assert!(g.output_facts(&[&a, &Fact::known(DType::F32, &[2, 10, 384])]).is_err());
        assert!(g.output_facts(&[&a, &w, &Fact::known(DType::F64, &[10])]).is_err());
        assert!(g.output_facts(&[&a]).is_err());
        let bad = Gemm { alpha: f32::NAN, ..g };
        assert!(bad.output_facts(&[&a, &w]).is_err());

        let x = t(&[2, 3], vec![0f32; 6]);
        let e = g.eval(&[&x, &t(&[4, 2], vec![0f32; 8])]).unwrap_err();
        assert!(e.to_string().contains("inner dimension"), "{e}");
        assert!(g.eval(&[&x, &t(&[4, 3], vec![0f32; 12]), &t(&[3], vec![0f32; 3])]).is_err());
        assert!(g.eval(&[&x, &t(&[4, 3], vec![0f32; 12]), &t(&[2, 4], vec![0f32; 8])]).is_ok());
        assert!(g.eval(&[&t(&[6], vec![0f32; 6]), &x]).is_err());
    }

    /// Independent reference: numpy matmul by explicit index arithmetic.
    fn naive_matmul(a: &[f64], sa: &[usize], b: &[f64], sb: &[usize]) -> (Vec<usize>, Vec<f64>) {
        let pa = if sa.len() == 1 { vec![1, sa[0]] } else { sa.to_vec() };
        let pb = if sb.len() == 1 { vec![sb[0], 1] } else { sb.to_vec() };
        let (m, k, n) = (pa[pa.len() - 2], pa[pa.len() - 1], pb[pb.len() - 1]);
        let (ba, bb) = (&pa[..pa.len() - 2], &pb[..pb.len() - 2]);
        let r = ba.len().max(bb.len());
        let get = |s: &[usize], ax: usize| {
            if ax + s.len() >= r {
                s[ax + s.len() - r]
            } else {
                1
            }
        };
        let batch: Vec<usize> = (0..r).map(|ax| get(ba, ax).max(get(bb, ax))).collect();
        let nb: usize = batch.iter().product();
        let mut vals = vec![];
        for flat in 0..nb {
            let mut idx = vec![0; r];
            let mut f = flat;
            for ax in (0..r).rev() {
                idx[ax] = f % batch[ax];
                f /= batch[ax];
            }
            let mat = |s: &[usize]| {
                (0..r).fold(0, |acc, ax| {
                    let d = get(s, ax);
                    acc * d + if d == 1 { 0 } else { idx[ax] }
                })
            };
            let (ia, ib) = (mat(ba), mat(bb));
            for i in 0..m {
                for j in 0..n {
                    let mut s = 0.0;
                    for kk in 0..k {
                        s += a[ia * m * k + i * k + kk] * b[ib * k * n + kk * n + j];
                    }
                    vals.push(s);
                }
            }
        }
        let mut shape = batch;
        if sa.len() >= 2 {
            shape.push(m);
        }
        if sb.len() >= 2 {
            shape.push(n);
        }
        (shape, vals)
    }

    fn matmul_shapes() -> impl Strategy<Value = (Vec<usize>, Vec<usize>)> {
        let batch = prop::collection::vec((1usize..4, any::<bool>(), any::<bool>()), 0..3);
        (batch, 0usize..3, 0usize..3, (0usize..5, 0usize..6, 0usize..5), any::<(bool, bool)>()).prop_map(
            |(batch, drop_a, drop_b, (m, k, n), (vec_a, vec_b))| {
                let ba: Vec<usize> = batch.iter().map(|&(d, one, _)| if one { 1 } else { d }).collect();
                let bb: Vec<usize> = batch.iter().map(|&(d, _, one)| if one { 1 } else { d }).collect();
                let ba = &ba[drop_a.min(ba.len())..];
                let bb = &bb[drop_b.min(bb.len())..];
                let sa = if vec_a && ba.is_empty() { vec![k] } else { [ba, &[m, k]].concat() };
                let sb = if vec_b && bb.is_empty() { vec![k] } else { [bb, &[k, n]].concat() };
                (sa, sb)
            },
        )
    }

    proptest! {
        #[test]
        fn matmul_matches_naive((sa, sb) in matmul_shapes(), seed in any::<u32>()) {
            let na: usize = sa.iter().product();
            let nb: usize = sb.iter().product();
            let val = |i: usize, salt: u32| (((i as u32).wrapping_mul(2654435761).wrapping_add(seed ^ salt) >> 16) % 19) as f64 - 9.0;
            let a: Vec<f64> = (0..na).map(|i| val(i, 1)).collect();
            let b: Vec<f64> = (0..nb).map(|i| val(i, 2)).collect();
            let (shape, want) = naive_matmul(&a, &sa, &b, &sb);
            let y = run(MatMul, &[&t(&sa, a.clone()), &t(&sb, b.clone())]);
            prop_assert_eq!(y.shape(), shape.as_slice());
            prop_assert_eq!(y.as_slice::<f64>().unwrap(), want.as_slice());
            // Integers and f32 take other kernels; small integers are exact in all of them.
            let ai: Vec<i64> = a.iter().map(|&v| v as i64).collect();
            let bi: Vec<i64> = b.iter().map(|&v| v as i64).collect();
            let y = run(MatMul, &[&t(&sa, ai), &t(&sb, bi)]);
            prop_assert_eq!(y.to_f64_vec(), want.clone());
            let af: Vec<f32> = a.iter().map(|&v| v as f32).collect();
            let bf: Vec<f32> = b.iter().map(|&v| v as f32).collect();
            let y = run(MatMul, &[&t(&sa, af), &t(&sb, bf)]);
            prop_assert_eq!(y.to_f64_vec(), want);
        }
    }
}

//! Tensors of msprobe entries brought into the contract's layouts: axes permuted
//! (`BSND`, `BNDS` to `BNSD`), GQA repeats of key/value heads undone, a site split over
//! tensor-parallel ranks put back together (concatenated along an axis, or partial sums
//! added), and one part of a fused q/k/v projection taken.

use crate::Tensor;
use contract::error::{Error, Result};

use super::map::{self, FusedLayout, GateUpPart, Heads, Layout, QkvPart};

/// The ranks' tensors of one site, `(data file, tensor)` rank 0 first, concatenated
/// along `axis`: `[.., a0 + a1 + .., ..]`. Every rank's tensor must have rank 0's dtype
/// and shape off `axis`; the first that does not is named.
pub(super) fn concat(parts: &[(std::path::PathBuf, Tensor)], axis: usize) -> Result<Tensor> {
    let (_, first) = &parts[0];
    let shape = first.shape();
    if axis >= shape.len() {
        return Err(Error::format(
            &parts[0].0,
            format!("ranks concatenate along axis {axis}, but the tensor has shape {shape:?}"),
        ));
    }
    for (file, t) in &parts[1..] {
        let off_axis = |s: &[usize]| {
            s.iter().enumerate().filter(|&(a, _)| a != axis).map(|(_, &d)| d).collect::<Vec<_>>()
        };
        if t.dtype() != first.dtype()
            || t.shape().len() != shape.len()
            || off_axis(t.shape()) != off_axis(shape)
        {
            return Err(Error::format(
                file,
                format!(
                    "ranks disagree: {:?} {:?} here, rank 0 has {:?} {:?} (concatenated along axis {axis})",
                    t.dtype(),
                    t.shape(),
                    first.dtype(),
                    shape
                ),
            ));
        }
    }
    let size = first.dtype().size();
    let outer: usize = shape[..axis].iter().product();
    let inner: usize = shape[axis + 1..].iter().product();
    let mut out_shape = shape.to_vec();
    out_shape[axis] = parts.iter().map(|(_, t)| t.shape()[axis]).sum();
    let mut bytes = Vec::with_capacity(out_shape.iter().product::<usize>() * size);
    for o in 0..outer {
        for (_, t) in parts {
            let run = t.shape()[axis] * inner * size;
            bytes.extend_from_slice(&t.bytes()[o * run..(o + 1) * run]);
        }
    }
    Ok(Tensor::owned(first.dtype(), out_shape, bytes))
}

/// The ranks' tensors of one site added element by element (in float64, rounded once
/// to their dtype). Every rank's tensor must have rank 0's dtype and shape.
pub(super) fn sum(parts: &[(std::path::PathBuf, Tensor)]) -> Result<Tensor> {
    let (_, first) = &parts[0];
    for (file, t) in &parts[1..] {
        if t.dtype() != first.dtype() || t.shape() != first.shape() {
            return Err(Error::format(
                file,
                format!(
                    "ranks disagree: {:?} {:?} here, rank 0 has {:?} {:?} (partial sums added)",
                    t.dtype(),
                    t.shape(),
                    first.dtype(),
                    first.shape()
                ),
            ));
        }
    }
    let mut acc = first.to_f64_vec();
    for (_, t) in &parts[1..] {
        for (a, v) in acc.iter_mut().zip(t.iter_f64()) {
            *a += v;
        }
    }
    Ok(Tensor::from_f64(first.shape(), &acc, first.dtype()))
}

/// Part `part` of a fused q/k/v projection `t` (`[.., (q_heads + 2·kv_heads)·head_dim]`,
/// heads ordered by `layout`), as `[.., heads·head_dim]`. `file` is named when the last
/// axis does not hold those heads.
pub(super) fn split_qkv(
    file: &std::path::Path,
    t: &Tensor,
    part: QkvPart,
    layout: FusedLayout,
    (q_heads, kv_heads, head_dim): (usize, usize, usize),
) -> Result<Tensor> {
    let width = (q_heads + 2 * kv_heads) * head_dim;
    let last = t.shape().len().checked_sub(1);
    let fits = kv_heads > 0 && q_heads % kv_heads == 0;
    let Some(axis) = last.filter(|&a| t.shape()[a] == width && fits) else {
        return Err(Error::format(
            file,
            format!(
                "fused q/k/v tensor of shape {:?}: its last axis should hold ({q_heads} + 2 x {kv_heads}) heads x {head_dim} = {width}",
                t.shape()
            ),
        ));
    };
    let heads: Vec<usize> = match layout {
        FusedLayout::Blocks => match part {
            QkvPart::Q => (0..q_heads).collect(),
            QkvPart::K => (q_heads..q_heads + kv_heads).collect(),
            QkvPart::V => (q_heads + kv_heads..q_heads + 2 * kv_heads).collect(),
        },
        FusedLayout::Groups => {
            let rep = q_heads / kv_heads;
            let group = |g: usize| g * (rep + 2);
            match part {
                QkvPart::Q => (0..kv_heads).flat_map(|g| group(g)..group(g) + rep).collect(),
                QkvPart::K => (0..kv_heads).map(|g| group(g) + rep).collect(),
                QkvPart::V => (0..kv_heads).map(|g| group(g) + rep + 1).collect(),
            }
        }
    };
    let cols: Vec<usize> = heads.iter().flat_map(|h| h * head_dim..(h + 1) * head_dim).collect();
    Ok(select(t, axis, &cols))
}

/// Half `part` of a fused gate/up projection `t` (`[.., 2·units]`, ordered by `layout`:
/// `Blocks` `[gate | up]`, `Groups` `[g0, u0, g1, u1, ..]`), as `[.., units]`. `file` is
/// named when the last axis is not `2·units` wide.
pub(super) fn split_gate_up(
    file: &std::path::Path,
    t: &Tensor,
    part: GateUpPart,
    layout: FusedLayout,
    units: usize,
) -> Result<Tensor> {
    let last = t.shape().len().checked_sub(1);
    let Some(axis) = last.filter(|&a| units > 0 && t.shape()[a] == 2 * units) else {
        return Err(Error::format(
            file,
            format!(
                "fused gate/up tensor of shape {:?}: its last axis should hold 2 x {units} = {}",
                t.shape(),
                2 * units
            ),
        ));
    };
    let up = usize::from(part == GateUpPart::Up);
    let cols: Vec<usize> = match layout {
        FusedLayout::Blocks => (up * units..(up + 1) * units).collect(),
        FusedLayout::Groups => (0..units).map(|j| 2 * j + up).collect(),
    };
    Ok(select(t, axis, &cols))
}

/// A head-split tensor in the contract's `[batch, heads, seq, head_dim]`, GQA repeats
/// undone for key/value sites.
pub(super) fn normalise(t: Tensor, rule: &map::Rule, q_heads: usize, kv_heads: usize) -> Tensor {
    if t.shape().len() != 4 {
        return t;
    }
    let t = match rule.layout {
        Some(Layout::Bsnd) => permute(&t, &[0, 2, 1, 3]),
        Some(Layout::Bnds) => permute(&t, &[0, 1, 3, 2]),
        _ => t,
    };
    if rule.heads != Some(Heads::Kv) || t.shape()[1] != q_heads || kv_heads >= q_heads {
        return t;
    }
    let rep = q_heads / kv_heads;
    let same = |a: usize, b: usize| head_bytes(&t, a) == head_bytes(&t, b);
    // HF's repeat_kv repeats each key/value head `rep` times in a row (h // rep); a port
    // that tiles them (h % kv_heads) stores the same cache and pairs heads differently,
    // which shows at the scores. Either way the stored heads are recovered.
    let interleaved = (0..q_heads).all(|h| same(h, (h / rep) * rep));
    let tiled = (0..q_heads).all(|h| same(h, h % kv_heads));
    let heads: Vec<usize> = if !interleaved && tiled {
        (0..kv_heads).collect()
    } else {
        (0..kv_heads).map(|g| g * rep).collect()
    };
    select(&t, 1, &heads)
}

fn head_bytes(t: &Tensor, h: usize) -> Vec<u8> {
    select(t, 1, &[h]).bytes().to_vec()
}

/// `t` with its axes reordered: output axis `k` is input axis `perm[k]`.
pub(super) fn permute(t: &Tensor, perm: &[usize]) -> Tensor {
    let shape = t.shape();
    let mut in_stride = vec![1usize; shape.len()];
    for a in (0..shape.len().saturating_sub(1)).rev() {
        in_stride[a] = in_stride[a + 1] * shape[a + 1];
    }
    let out_shape: Vec<usize> = perm.iter().map(|&p| shape[p]).collect();
    let strides: Vec<usize> = perm.iter().map(|&p| in_stride[p]).collect();
    gather(t, out_shape, &strides, 0)
}

/// `t` restricted to `indices` along `axis`.
pub(super) fn select(t: &Tensor, axis: usize, indices: &[usize]) -> Tensor {
    let shape = t.shape();
    let size = t.dtype().size();
    let mut stride = vec![1usize; shape.len()];
    for a in (0..shape.len().saturating_sub(1)).rev() {
        stride[a] = stride[a + 1] * shape[a + 1];
    }
    let mut out_shape = shape.to_vec();
    out_shape[axis] = indices.len();
    let numel: usize = out_shape.iter().product();
    let src = t.bytes();
    let mut bytes = Vec::with_capacity(numel * size);
    let mut idx = vec![0usize; shape.len()];
    for _ in 0..numel {
        let e: usize = idx
            .iter()
            .enumerate()
            .map(|(a, &i)| if a == axis { indices[i] } else { i } * stride[a])
            .sum();
        bytes.extend_from_slice(&src[e * size..(e + 1) * size]);
        advance(&mut idx, &out_shape);
    }
    Tensor::owned(t.dtype(), out_shape, bytes)
}

fn gather(t: &Tensor, out_shape: Vec<usize>, strides: &[usize], start: usize) -> Tensor {
    let size = t.dtype().size();
    let numel: usize = out_shape.iter().product();
    let src = t.bytes();
    let mut bytes = Vec::with_capacity(numel * size);
    let mut idx = vec![0usize; out_shape.len()];
    for _ in 0..numel {
        let e = start + idx.iter().zip(strides).map(|(i, s)| i * s).sum::<usize>();
        bytes.extend_from_slice(&src[e * size..(e + 1) * size]);
        advance(&mut idx, &out_shape);
    }
    Tensor::owned(t.dtype(), out_shape, bytes)
}

fn advance(idx: &mut [usize], shape: &[usize]) {
    for a in (0..shape.len()).rev() {
        idx[a] += 1;
        if idx[a] < shape[a] {
            return;
        }
        idx[a] = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::DType;
    use std::path::PathBuf;

    #[test]
    fn permute_then_back_is_identity() {
        let v: Vec<f64> = (0..24).map(f64::from).collect();
        let t = Tensor::from_f64(&[1, 2, 3, 4], &v, DType::F32);
        let p = permute(&t, &[0, 1, 3, 2]);
        assert_eq!(p.shape(), &[1, 2, 4, 3]);
        // element [0,1,2,0] of p is element [0,1,0,2] of t: 12 + 0*4 + 2
        assert_eq!(p.get_f64(12 + 2 * 3), 14.0);
        let back = permute(&p, &[0, 1, 3, 2]);
        assert_eq!(back.bytes(), t.bytes());
    }

    #[test]
    fn repeated_kv_heads_are_undone_either_way() {
        let rule = map::Rule {
            site: "k".into(),
            module: None,
            api: None,
            nth: 0,
            take: None,
            layout: None,
            heads: Some(Heads::Kv),
            tail_of: None,
            ranks: None,
            fused_qkv: None,
            fused_gate_up: None,
            fused_layout: FusedLayout::Blocks,
        };
        // kv heads a=[1,1], b=[2,2]; 4 query heads.
        let inter = Tensor::from_f64(&[1, 4, 1, 2], &[1., 1., 1., 1., 2., 2., 2., 2.], DType::F32);
        let tiled = Tensor::from_f64(&[1, 4, 1, 2], &[1., 1., 2., 2., 1., 1., 2., 2.], DType::F32);
        let want = Tensor::from_f64(&[1, 2, 1, 2], &[1., 1., 2., 2.], DType::F32);
        assert_eq!(normalise(inter, &rule, 4, 2).bytes(), want.bytes());
        assert_eq!(normalise(tiled, &rule, 4, 2).bytes(), want.bytes());
    }

    fn ranked(ts: Vec<Tensor>) -> Vec<(PathBuf, Tensor)> {
        ts.into_iter().enumerate().map(|(r, t)| (PathBuf::from(format!("rank{r}.pt")), t)).collect()
    }

    #[test]
    fn ranks_concatenate_along_their_axis_and_sum() {
        // [1, 2, 2] split on axis 2 into two [1, 2, 1]: rows (1 2) (3 4).
        let a = Tensor::from_f64(&[1, 2, 1], &[1., 3.], DType::F32);
        let b = Tensor::from_f64(&[1, 2, 1], &[2., 4.], DType::F32);
        let c = concat(&ranked(vec![a.clone(), b.clone()]), 2).unwrap();
        assert_eq!(c.shape(), &[1, 2, 2]);
        assert_eq!(c.to_f64_vec(), vec![1., 2., 3., 4.]);
        let c1 = concat(&ranked(vec![a.clone(), b.clone()]), 1).unwrap();
        assert_eq!(c1.shape(), &[1, 4, 1]);
        assert_eq!(c1.to_f64_vec(), vec![1., 3., 2., 4.]);
        let s = sum(&ranked(vec![a.clone(), b])).unwrap();
        assert_eq!(s.to_f64_vec(), vec![3., 7.]);
        // Rank 1 disagrees off the axis: named.
        let wide = Tensor::from_f64(&[1, 3, 1], &[0.; 3], DType::F32);
        let e = concat(&ranked(vec![a.clone(), wide.clone()]), 2).unwrap_err().to_string();
        assert!(e.starts_with("rank1.pt: ranks disagree"), "{e}");
        let e = sum(&ranked(vec![a, wide])).unwrap_err().to_string();
        assert!(e.starts_with("rank1.pt: ranks disagree"), "{e}");
    }

    #[test]
    fn fused_qkv_splits_by_blocks_and_by_groups() {
        // 4 query heads, 2 kv heads, head_dim 1: 8 columns, each holding its column index.
        let t =
            Tensor::from_f64(&[1, 1, 8], &(0..8).map(f64::from).collect::<Vec<_>>(), DType::F32);
        let f = std::path::Path::new("qkv.pt");
        let part = |p, l| split_qkv(f, &t, p, l, (4, 2, 1)).unwrap().to_f64_vec();
        assert_eq!(part(QkvPart::Q, FusedLayout::Blocks), vec![0., 1., 2., 3.]);
        assert_eq!(part(QkvPart::K, FusedLayout::Blocks), vec![4., 5.]);
        assert_eq!(part(QkvPart::V, FusedLayout::Blocks), vec![6., 7.]);
        // groups: [q0 q1 k0 v0 | q2 q3 k1 v1]
        assert_eq!(part(QkvPart::Q, FusedLayout::Groups), vec![0., 1., 4., 5.]);
        assert_eq!(part(QkvPart::K, FusedLayout::Groups), vec![2., 6.]);
        assert_eq!(part(QkvPart::V, FusedLayout::Groups), vec![3., 7.]);
        let e = split_qkv(f, &t, QkvPart::Q, FusedLayout::Blocks, (4, 1, 1)).unwrap_err();
        assert!(e.to_string().starts_with("qkv.pt: fused q/k/v tensor of shape [1, 1, 8]"), "{e}");
    }

    #[test]
    fn fused_gate_up_splits_by_blocks_and_by_pairs() {
        // 4 units: 8 columns, each holding its column index.
        let t =
            Tensor::from_f64(&[1, 1, 8], &(0..8).map(f64::from).collect::<Vec<_>>(), DType::F32);
        let f = std::path::Path::new("gu.npy");
        let part = |p, l| split_gate_up(f, &t, p, l, 4).unwrap().to_f64_vec();
        assert_eq!(part(GateUpPart::Gate, FusedLayout::Blocks), vec![0., 1., 2., 3.]);
        assert_eq!(part(GateUpPart::Up, FusedLayout::Blocks), vec![4., 5., 6., 7.]);
        // pairs: [g0 u0 g1 u1 g2 u2 g3 u3]
        assert_eq!(part(GateUpPart::Gate, FusedLayout::Groups), vec![0., 2., 4., 6.]);
        assert_eq!(part(GateUpPart::Up, FusedLayout::Groups), vec![1., 3., 5., 7.]);
        let e = split_gate_up(f, &t, GateUpPart::Up, FusedLayout::Blocks, 3).unwrap_err();
        assert!(
            e.to_string().starts_with("gu.npy: fused gate/up tensor of shape [1, 1, 8]"),
            "{e}"
        );
    }
}

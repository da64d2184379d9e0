//! The loss of a training step and its gradient: HF's `ForCausalLMLoss`.
//!
//! `logits.float()`; labels padded with -100 on the right and shifted (`labels[t+1]` is
//! the target of the logits at `t`, the last position has none);
//! `cross_entropy(reduction="sum", ignore_index=-100) / (labels != -100).sum()`. With `N`
//! micro-batches (rows `k·B/N … (k+1)·B/N − 1` each) the loss is the mean of the
//! micro-batch losses, each averaged over its own labels, so a row's gradient is
//! `(softmax − onehot) / (count_k · N)`. Everything here is in the softmax's dtype
//! (float32 in HF and MindFormers; float64 in the reference); the logits' gradient is then
//! stored in the compute dtype.
//!
//! Two faults of §6 act here ([`LossRule`]): labels not shifted, and the ignored
//! positions counted in the mean.

use ndarray::Array3;

use contract::error::{Error, Result};

use super::Storage;

/// The label HF ignores.
pub const IGNORE_INDEX: i64 = -100;

/// How the loss pairs logits with labels and what it averages over.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct LossRule {
    /// `train.labels_unshifted`: logits at `t` paired with `labels[t]`.
    pub unshifted: bool,
    /// `train.ignore_index_counted`: every shifted position of the micro-batch counted
    /// in the mean, `rows · (P − 1)` (ignored ones add 0 to the sum).
    pub count_ignored: bool,
    /// `train.micro_batches_summed`: micro-batch gradients summed, not averaged.
    pub summed: bool,
}

/// The loss and the gradient of `loss × scale` with respect to the logits.
#[derive(Debug, Clone)]
pub struct Loss {
    /// The mean of the micro-batch losses.
    pub value: f64,
    /// `[batch, seq, vocab]`: `d (loss × scale) / d logits`, in the compute dtype.
    pub dlogits: Array3<f64>,
}

/// The target of the logits at each position `[batch][seq]` (`None`: no target).
pub fn targets(labels: &[Vec<i64>], rule: LossRule) -> Vec<Vec<Option<usize>>> {
    labels
        .iter()
        .map(|row| {
            (0..row.len())
                .map(|t| {
                    let l = if rule.unshifted { row.get(t) } else { row.get(t + 1) };
                    l.copied().filter(|&l| l != IGNORE_INDEX).map(|l| l as usize)
                })
                .collect()
        })
        .collect()
}

/// The cross entropy of `logits` `[batch, seq, vocab]` against `labels` `[batch][seq]`
/// over `micro_batches` equal parts of the batch, and the gradient of `loss × scale`.
/// A label outside the vocabulary (and not -100), or a micro-batch with no label
/// counted, is a `Scenario` error naming `train.labels`.
pub fn cross_entropy(
    logits: &Array3<f64>,
    labels: &[Vec<i64>],
    micro_batches: usize,
    rule: LossRule,
    scale: f64,
    st: Storage,
) -> Result<Loss> {
    let (b, t, v) = logits.dim();
    if labels.len() != b || labels.iter().any(|r| r.len() != t) {
        return Err(Error::scenario("train.labels", format!("must be [{b}][{t}], like input_ids")));
    }
    if let Some(bad) =
        labels.iter().flatten().find(|&&l| l != IGNORE_INDEX && (l < 0 || l >= v as i64))
    {
        return Err(Error::scenario(
            "train.labels",
            format!("label {bad} is neither -100 nor inside the vocabulary (size {v})"),
        ));
    }
    let n = micro_batches.max(1);
    let rows = b / n;
    let tg = targets(labels, rule);
    let r = |x: f64| st.softmax(x);
    let mut dlogits = Array3::zeros((b, t, v));
    let mut total = 0.0;
    for k in 0..n {
        let part = k * rows..(k + 1) * rows;
        let counted = if rule.count_ignored {
            // Every position that has a label slot after the shift: `P − 1` a row
            // (unshifted, all `P`).
            rows * if rule.unshifted { t } else { t - 1 }
        } else {
            tg[part.clone()].iter().flatten().filter(|x| x.is_some()).count()
        };
        if counted == 0 {
            return Err(Error::scenario(
                "train.labels",
                format!(
                    "micro-batch {k} (rows {}..{}) has no label but -100",
                    part.start, part.end
                ),
            ));
        }
        let mut sum = 0.0;
        let per = if rule.summed { 1.0 } else { n as f64 };
        let g = scale / (counted as f64 * per);
        for bi in part {
            for (ti, target) in tg[bi].iter().enumerate() {
                let Some(target) = *target else { continue };
                let z = logits.slice(ndarray::s![bi, ti, ..]);
                let m = z.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                let mut se = 0.0;
                for &x in z.iter() {
                    se = r(se + r(r(x - m).exp()));
                }
                let lse = r(m + r(se.ln()));
                sum = r(sum + r(lse - z[target]));
                let mut d = dlogits.slice_mut(ndarray::s![bi, ti, ..]);
                for (o, &x) in d.iter_mut().zip(z.iter()) {
                    *o = r(r(r(x - lse).exp()) * g);
                }
                d[target] = r(d[target] - g);
            }
        }
        total += r(sum / counted as f64);
    }
    st.act(&mut dlogits);
    Ok(Loss { value: r(total / n as f64), dlogits })
}

//! Tensor-parallel ranks put back together from what they hold, without a map's `ranks`
//! rule: for each site, the ranks' shapes and values against the contract's shape say
//! how the port split it.
//!
//! | what the ranks hold | kind | put back by |
//! |---|---|---|
//! | the whole tensor, bit for bit the same | `replicated` | rank 0's |
//! | one piece each along one axis | `concat(A)` | concatenating in rank order |
//! | as above, groups of consecutive ranks identical (key/value heads replicated when the ranks outnumber them, as Megatron does) | `concat(A), key/value heads replicated over R ranks` | one rank a group, concatenated |
//! | `lm_head` pieces that make more than the vocabulary (vocabulary padded to divide among ranks) | `concat(A), vocab padded from Vp` | concatenated, the padding cut |
//! | the whole tensor, different on each rank, at a site that follows a row-parallel projection (o_proj, the MLP, a vocabulary-parallel embedding) | `sum` | adding (partial sums before their all-reduce) |
//! | one rank alone (pipeline stages: ranks holding different layers) | `stage: rank R` | that rank's |
//!
//! Tried in that order, except that pieces whose concatenation makes the whole are
//! concatenated before whole-and-different is considered (a rank's share of repeated
//! key/value heads can have the shape of the unrepeated whole).
//!
//! Ranks that hold the whole tensor where they should be identical, and are not (or a
//! rank of a key/value replica group unlike the others), are a finding: the site is a
//! rank divergence naming the ranks that differ from the others, judged on the
//! majority's tensor, never an average.

use std::path::PathBuf;

use contract::site::{LayerPart, Site};

use super::{layout, Stats};
use crate::Tensor;

/// Replicas within this relative L2 distance of each other are one tensor that drifted
/// (a rank divergence) rather than partial sums: partial sums over disjoint shards of a
/// row-parallel product differ from each other by O(1) relative.
pub const REPLICA_DRIFT: f64 = 0.05;

/// How one site's ranks were put back together, and what that found.
#[derive(Debug, Clone, PartialEq)]
pub struct Reassembly {
    /// The kind, in words (`replicated`, `concat(2)`, `sum`, `stage: rank 1`, ...);
    /// prefixed `map: ` when a map's `ranks` rule decided it.
    pub kind: String,
    /// Ranks that disagree where they should be identical, named.
    pub divergence: Option<String>,
    /// Where a statistics merge is not exact, what it could not give.
    pub inexact: Option<String>,
    /// The merged statistics bound the real tensor's from one side only: its Max and
    /// Norm are upper bounds and its Min a lower bound (statistics that count padding of
    /// unknown values); its Mean is not known.
    pub one_sided: bool,
}

impl Reassembly {
    /// What a map's `ranks` rule declared.
    pub(super) fn declared(kind: String) -> Reassembly {
        Reassembly::kind(format!("map: {kind}"))
    }

    fn kind(kind: impl Into<String>) -> Reassembly {
        Reassembly { kind: kind.into(), divergence: None, inexact: None, one_sided: false }
    }
}

/// One rank's piece of a site: its rank number, the data file (for messages) and the
/// tensor in the recorded layout.
pub(crate) type Part = (usize, PathBuf, Tensor);

/// Whether a site can be a partial sum: the output of a row-parallel projection (o_proj,
/// down_proj as the MLP's output), a vocabulary-parallel embedding, or a site outside
/// the contract's table.
pub(super) fn may_be_partial(site: &Site) -> bool {
    matches!(
        site,
        Site::Layer(_, LayerPart::OProj | LayerPart::Mlp) | Site::EmbedTokens | Site::Other(_)
    )
}

/// `shape` with axis `axis` the sum of the ranks' sizes along it.
fn concat_shape(shapes: &[&[usize]], axis: usize) -> Option<Vec<usize>> {
    let first = shapes[0];
    if axis >= first.len() {
        return None;
    }
    let off = |s: &[usize]| {
        s.iter().enumerate().filter(|&(a, _)| a != axis).map(|(_, &d)| d).collect::<Vec<_>>()
    };
    if shapes.iter().any(|s| s.len() != first.len() || off(s) != off(first)) {
        return None;
    }
    let mut out = first.to_vec();
    out[axis] = shapes.iter().map(|s| s[axis]).sum();
    Some(out)
}

/// The axis along which the ranks' pieces make the whole (`fits`), trying the last axis
/// first, then the head axis (1), then the rest; `None` when none does.
fn concat_axis(shapes: &[&[usize]], fits: &dyn Fn(&[usize]) -> bool) -> Option<usize> {
    let n = shapes[0].len();
    let mut order: Vec<usize> = (0..n).rev().collect();
    if n > 2 {
        order.retain(|&a| a != 1);
        order.insert(1, 1);
    }
    order.into_iter().find(|&a| concat_shape(shapes, a).is_some_and(|s| fits(&s)))
}

/// Ranks grouped by identity (`same`), each group in rank order, groups in order of
/// their first rank.
fn groups<T>(items: &[T], same: impl Fn(&T, &T) -> bool) -> Vec<Vec<usize>> {
    let mut out: Vec<Vec<usize>> = Vec::new();
    for (i, x) in items.iter().enumerate() {
        match out.iter_mut().find(|g| same(&items[g[0]], x)) {
            Some(g) => g.push(i),
            None => out.push(vec![i]),
        }
    }
    out
}

/// The rank divergence among `k` replicas grouped by identity: the largest group (the
/// first of equal size) is the reference; the others are named. Returns the reference's
/// first index and the words.
fn divergence(
    ranks: &[usize],
    groups: &[Vec<usize>],
    detail: impl Fn(usize, usize) -> String,
) -> (usize, String) {
    let reference = groups.iter().max_by_key(|g| (g.len(), std::cmp::Reverse(g[0]))).unwrap();
    let r0 = reference[0];
    let odd: Vec<String> = groups
        .iter()
        .filter(|g| g[0] != r0)
        .flatten()
        .map(|&i| format!("rank {} ({})", ranks[i], detail(i, r0)))
        .collect();
    let refs: Vec<String> = reference.iter().map(|&i| ranks[i].to_string()).collect();
    let text = format!(
        "rank divergence: {} differ{} from rank{} {} where the ranks should hold the same tensor",
        odd.join(", "),
        if odd.len() == 1 { "s" } else { "" },
        if refs.len() == 1 { "" } else { "s" },
        refs.join(", ")
    );
    (r0, text)
}

/// Relative L2 distance of two tensors of one shape (0 for two zero tensors).
fn rel_distance(a: &Tensor, b: &Tensor) -> f64 {
    let (mut d, mut na, mut nb) = (0.0, 0.0, 0.0);
    for (x, y) in a.iter_f64().zip(b.iter_f64()) {
        d += (x - y) * (x - y);
        na += x * x;
        nb += y * y;
    }
    let n = na.max(nb).sqrt();
    if n == 0.0 {
        0.0
    } else {
        d.sqrt() / n
    }
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    a.iter_f64().zip(b.iter_f64()).map(|(x, y)| (x - y).abs()).fold(0.0, f64::max)
}

/// The ranks' tensors of one site put back together, the kind inferred. `total` is the
/// number of ranks of the dump (a site fewer ranks hold is a pipeline stage's);
/// `fits(shape)` says whether a tensor of that recorded shape is the whole site (its
/// layout normalised to the contract's); `vocab` is the vocabulary size for `lm_head`.
pub(crate) fn tensors(
    mut parts: Vec<Part>,
    total: usize,
    site: &Site,
    fits: &dyn Fn(&[usize]) -> bool,
    vocab: Option<usize>,
) -> crate::Result<(Tensor, Reassembly)> {
    let ranks: Vec<usize> = parts.iter().map(|p| p.0).collect();
    let prefix = if parts.len() < total {
        match &ranks[..] {
            [r] => {
                return Ok((parts.swap_remove(0).2, Reassembly::kind(format!("stage: rank {r}"))))
            }
            _ => format!("stage: ranks {}; ", list(&ranks)),
        }
    } else {
        String::new()
    };
    let named = |r: Reassembly| Reassembly { kind: format!("{prefix}{}", r.kind), ..r };
    let ts: Vec<&Tensor> = parts.iter().map(|p| &p.2).collect();
    let shapes: Vec<&[usize]> = ts.iter().map(|t| t.shape()).collect();
    let same_shape =
        shapes.iter().all(|s| *s == shapes[0]) && ts.iter().all(|t| t.dtype() == ts[0].dtype());
    let detail = |i: usize, r: usize| {
        format!(
            "rel-L2 {:.2e}, max |d| {:.2e}",
            rel_distance(ts[i], ts[r]),
            max_abs_diff(ts[i], ts[r])
        )
    };
    let g = groups(&ts, |a, b| a.bytes() == b.bytes());
    if same_shape && g.len() == 1 {
        return Ok((ts[0].clone(), named(Reassembly::kind("replicated"))));
    }
    let files: Vec<(PathBuf, Tensor)> = parts.iter().map(|p| (p.1.clone(), p.2.clone())).collect();
    // Pieces that make the whole are concatenated first: a rank's share of repeated
    // key/value heads can have the shape of the unrepeated whole.
    if let Some(axis) = concat_axis(&shapes, fits) {
        let kind = Reassembly::kind(format!("concat({axis})"));
        return Ok((layout::concat(&files, axis)?, named(kind)));
    }
    if same_shape && fits(shapes[0]) {
        let far = ts.iter().any(|t| rel_distance(t, ts[0]) >= REPLICA_DRIFT);
        if may_be_partial(site) && far {
            return Ok((layout::sum(&files)?, named(Reassembly::kind("sum"))));
        }
        let (r, text) = divergence(&ranks, &g, detail);
        let kind = Reassembly {
            kind: "replicated".into(),
            divergence: Some(text),
            inexact: None,
            one_sided: false,
        };
        return Ok((ts[r].clone(), named(kind)));
    }
    // Key/value heads replicated over groups of consecutive ranks.
    let k = parts.len();
    if same_shape {
        for rep in (2..k).filter(|r| k.is_multiple_of(*r)) {
            let reps: Vec<&[usize]> = shapes.iter().step_by(rep).copied().collect();
            let Some(axis) = concat_axis(&reps, fits) else { continue };
            let mut odd = Vec::new();
            for grp in (0..k).collect::<Vec<_>>().chunks(rep) {
                let members: Vec<&Tensor> = grp.iter().map(|&i| ts[i]).collect();
                let gg = groups(&members, |a, b| a.bytes() == b.bytes());
                if gg.len() > 1 {
                    let sub: Vec<usize> = grp.iter().map(|&i| ranks[i]).collect();
                    odd.push(divergence(&sub, &gg, |i, r| detail(grp[i], grp[r])).1);
                }
            }
            let picked: Vec<(PathBuf, Tensor)> = files.iter().step_by(rep).cloned().collect();
            let kind = Reassembly {
                kind: format!("concat({axis}), key/value heads replicated over {rep} ranks"),
                divergence: (!odd.is_empty()).then(|| odd.join("; ")),
                inexact: None,
                one_sided: false,
            };
            return Ok((layout::concat(&picked, axis)?, named(kind)));
        }
    }
    // A vocabulary padded to divide among the ranks: the padding cut.
    if let (Site::LmHead, Some(v)) = (site, vocab) {
        let last = shapes[0].len().saturating_sub(1);
        if let Some(mut whole) = concat_shape(&shapes, last) {
            let padded = whole[last];
            whole[last] = v;
            if padded > v && fits(&whole) {
                let t = layout::concat(&files, last)?;
                let cols: Vec<usize> = (0..v).collect();
                let kind = format!("concat({last}), vocab padded from {padded}");
                return Ok((layout::select(&t, last, &cols), named(Reassembly::kind(kind))));
            }
        }
    }
    let shown: Vec<String> = shapes.iter().map(|s| format!("{s:?}")).collect();
    Ok((
        parts.swap_remove(0).2,
        named(Reassembly::kind(format!(
            "rank {} alone: no reassembly of the ranks' shapes {} makes the golden's",
            ranks[0],
            shown.join(", ")
        ))),
    ))
}

fn list(ranks: &[usize]) -> String {
    ranks.iter().map(usize::to_string).collect::<Vec<_>>().join(", ")
}

/// Statistics of ranks merged: each rank's statistics and recorded shape, rank order.
pub(super) type StatPart = (usize, Stats, Vec<usize>);

/// Statistics relatively this close are one tensor's (a replica that drifted by rounding)
/// rather than different partial sums.
const STATS_SAME: f64 = 1e-6;

/// The statistics of the ranks' pieces of one site merged, the kind inferred as for
/// [`tensors`] from shapes and statistics: replicated (rank 0's), concatenated (Max of
/// the maxima, Min of the minima, the Mean weighted by elements, the root of the summed
/// squared Norms: exact), partial sums (the Mean is the sum of the Means; the Max, Min
/// and Norm of a sum are not known from its terms', said in `inexact`). `None` when
/// nothing fits the golden's shape (rank 0's statistics are then judged as they are).
pub(super) fn statistics(
    parts: &[StatPart],
    total: usize,
    site: &Site,
    fits: &dyn Fn(&[usize]) -> bool,
    vocab: Option<usize>,
) -> (Stats, Vec<usize>, Reassembly) {
    let ranks: Vec<usize> = parts.iter().map(|p| p.0).collect();
    if parts.len() < total && parts.len() == 1 {
        return (
            parts[0].1,
            parts[0].2.clone(),
            Reassembly::kind(format!("stage: rank {}", ranks[0])),
        );
    }
    let prefix = if parts.len() < total {
        format!("stage: ranks {}; ", list(&ranks))
    } else {
        String::new()
    };
    let named = |r: Reassembly| Reassembly { kind: format!("{prefix}{}", r.kind), ..r };
    let shapes: Vec<&[usize]> = parts.iter().map(|p| p.2.as_slice()).collect();
    let same_shape = shapes.iter().all(|s| *s == shapes[0]);
    let all = |s: &Stats| [s.max, s.min, s.mean, s.norm];
    let close = |a: &Stats, b: &Stats| {
        all(a).iter().zip(all(b)).all(|(x, y)| match (x, y) {
            (Some(x), Some(y)) => x == &y || (x - y).abs() <= STATS_SAME * x.abs().max(y.abs()),
            (None, None) => true,
            _ => false,
        })
    };
    let detail = |i: usize, r: usize| {
        let (a, b) = (&parts[i].1, &parts[r].1);
        format!("Norm {:?} against {:?}, Max {:?} against {:?}", a.norm, b.norm, a.max, b.max)
    };
    let stats: Vec<Stats> = parts.iter().map(|p| p.1).collect();
    let g = groups(&stats, |a, b| all(a) == all(b));
    if same_shape && g.len() == 1 {
        return (stats[0], shapes[0].to_vec(), named(Reassembly::kind("replicated")));
    }
    if let Some(axis) = concat_axis(&shapes, fits) {
        let (s, shape) = concat_stats(&stats, &shapes, axis);
        return (s, shape, named(Reassembly::kind(format!("concat({axis})"))));
    }
    if same_shape && fits(shapes[0]) {
        let drift = stats.iter().all(|s| close(s, &stats[0]));
        if may_be_partial(site) && !drift {
            let mean = stats.iter().map(|s| s.mean).sum::<Option<f64>>();
            let merged = Stats { max: None, min: None, mean, norm: None };
            let r = Reassembly {
                kind: "sum".into(),
                divergence: None,
                inexact: Some(
                    "partial sums over ranks: the Max, Min and Norm of their sum are not known from the ranks' statistics; judged on the Mean (the sum of the ranks' Means) alone".into(),
                ),
                one_sided: false,
            };
            return (merged, shapes[0].to_vec(), named(r));
        }
        let (r, text) = divergence(&ranks, &g, detail);
        let kind = Reassembly {
            kind: "replicated".into(),
            divergence: Some(text),
            inexact: None,
            one_sided: false,
        };
        return (stats[r], shapes[0].to_vec(), named(kind));
    }
    let k = parts.len();
    if same_shape {
        for rep in (2..k).filter(|r| k.is_multiple_of(*r)) {
            let reps: Vec<&[usize]> = shapes.iter().step_by(rep).copied().collect();
            let Some(axis) = concat_axis(&reps, fits) else { continue };
            let mut odd = Vec::new();
            for grp in (0..k).collect::<Vec<_>>().chunks(rep) {
                let members: Vec<Stats> = grp.iter().map(|&i| stats[i]).collect();
                let gg = groups(&members, |a, b| all(a) == all(b));
                if gg.len() > 1 {
                    let sub: Vec<usize> = grp.iter().map(|&i| ranks[i]).collect();
                    odd.push(divergence(&sub, &gg, |i, r| detail(grp[i], grp[r])).1);
                }
            }
            let picked: Vec<Stats> = stats.iter().step_by(rep).copied().collect();
            let (s, shape) = concat_stats(&picked, &reps, axis);
            let kind = Reassembly {
                kind: format!("concat({axis}), key/value heads replicated over {rep} ranks"),
                divergence: (!odd.is_empty()).then(|| odd.join("; ")),
                inexact: None,
                one_sided: false,
            };
            return (s, shape, named(kind));
        }
    }
    if let (Site::LmHead, Some(v)) = (site, vocab) {
        if let Some((s, shape, r)) = padded_vocab_statistics(&stats, &shapes, &ranks, v, fits) {
            return (s, shape, named(r));
        }
    }
    let shown: Vec<String> = shapes.iter().map(|s| format!("{s:?}")).collect();
    let kind = format!(
        "rank {} alone: no reassembly of the ranks' shapes {} makes the golden's",
        ranks[0],
        shown.join(", ")
    );
    (stats[0], shapes[0].to_vec(), named(Reassembly::kind(kind)))
}

/// The statistics of `lm_head` pieces over a vocabulary padded from `v` to divide among
/// the ranks (the padding the last columns, as Megatron pads it), or `None` when the
/// pieces do not make such a vocabulary. Where the padding lies is known, its values are
/// not: ranks holding only padding are cut (exact); a rank holding real columns and
/// padding counts both in its statistics. Its padding is taken as zero when the ranks
/// holding only padding record zeros (Max, Min and Norm 0): the Mean is then re-weighted
/// to the real vocabulary and the Norm is exact, and a Max or Min a zero could be is left
/// out. Otherwise the merge is one-sided: its Max and Norm bound the real vocabulary's
/// from above, its Min from below, and its Mean is not known. Either way `inexact` says
/// so.
fn padded_vocab_statistics(
    stats: &[Stats],
    shapes: &[&[usize]],
    ranks: &[usize],
    v: usize,
    fits: &dyn Fn(&[usize]) -> bool,
) -> Option<(Stats, Vec<usize>, Reassembly)> {
    let last = shapes[0].len().checked_sub(1)?;
    let mut whole = concat_shape(shapes, last)?;
    let padded = whole[last];
    whole[last] = v;
    if padded <= v || !fits(&whole) {
        return None;
    }
    let (mut keep, mut pad_only, mut straddle) = (Vec::new(), Vec::new(), None);
    let mut start = 0;
    for (i, s) in shapes.iter().enumerate() {
        let end = start + s[last];
        if start >= v {
            pad_only.push(i);
        } else {
            keep.push(i);
            if end > v {
                straddle = Some((i, end - v));
            }
        }
        start = end;
    }
    let kept: Vec<Stats> = keep.iter().map(|&i| stats[i]).collect();
    let kept_shapes: Vec<&[usize]> = keep.iter().map(|&i| shapes[i]).collect();
    let (mut merged, _) = concat_stats(&kept, &kept_shapes, last);
    let kind = format!("concat({last}), vocab padded from {padded}");
    let named = |is: &[usize]| {
        let rs: Vec<usize> = is.iter().map(|&i| ranks[i]).collect();
        format!("rank{} {}", if rs.len() == 1 { "" } else { "s" }, list(&rs))
    };
    let cut = if pad_only.is_empty() {
        String::new()
    } else {
        format!(" ({} holding only padding cut)", named(&pad_only))
    };
    let Some((i, q)) = straddle else {
        return Some((merged, whole, Reassembly::kind(format!("{kind}{cut}"))));
    };
    let numel = |s: &[usize]| s.iter().product::<usize>() as f64;
    let counted: f64 = kept_shapes.iter().map(|s| numel(s)).sum();
    let real = numel(&whole);
    let zero = |s: &Stats| [s.max, s.min, s.norm].iter().all(|x| *x == Some(0.0));
    let known_zero = !pad_only.is_empty() && pad_only.iter().all(|&j| zero(&stats[j]));
    let straddler = named(&[i]);
    let (text, one_sided) = if known_zero {
        merged.mean = merged.mean.map(|m| m * counted / real);
        let mut left_out = Vec::new();
        if merged.max.is_some_and(|x| x <= 0.0) {
            merged.max = None;
            left_out.push("Max");
        }
        if merged.min.is_some_and(|x| x >= 0.0) {
            merged.min = None;
            left_out.push("Min");
        }
        let left_out = if left_out.is_empty() {
            String::new()
        } else {
            format!("; its {} left out (a padding zero could be it)", left_out.join(" and "))
        };
        (
            format!(
                "vocabulary padded from {v} to {padded}: {straddler} holds {q} padding columns among its own, taken as zero since the {} holding only padding record zeros: the Mean (re-weighted to {v} columns) and Norm are the real vocabulary's{left_out}",
                named(&pad_only)
            ),
            false,
        )
    } else {
        merged.mean = None;
        (
            format!(
                "vocabulary padded from {v} to {padded}: {straddler}'s statistics count its {q} padding columns, whose values are not known: the merged Max and Norm bound the real vocabulary's from above and the Min from below, judged one-sided; the Mean is not known"
            ),
            true,
        )
    };
    let r = Reassembly {
        kind: format!("{kind}{cut}"),
        divergence: None,
        inexact: Some(text),
        one_sided,
    };
    Some((merged, whole, r))
}

/// The statistics of pieces concatenated along `axis` (shapes already checked to agree
/// off it): max of the maxima, min of the minima, the element-weighted mean, the root
/// of the summed squared norms.
pub(super) fn concat_stats(
    stats: &[Stats],
    shapes: &[&[usize]],
    axis: usize,
) -> (Stats, Vec<usize>) {
    let all = |f: fn(&Stats) -> Option<f64>| stats.iter().map(f).collect::<Option<Vec<f64>>>();
    let numel = |s: &[usize]| s.iter().product::<usize>() as f64;
    let total: f64 = shapes.iter().map(|s| numel(s)).sum();
    let merged = Stats {
        max: all(|s| s.max).map(|v| v.into_iter().fold(f64::NEG_INFINITY, f64::max)),
        min: all(|s| s.min).map(|v| v.into_iter().fold(f64::INFINITY, f64::min)),
        mean: all(|s| s.mean)
            .map(|v| v.iter().zip(shapes).map(|(m, s)| m * numel(s)).sum::<f64>() / total),
        norm: all(|s| s.norm).map(|v| v.iter().map(|n| n * n).sum::<f64>().sqrt()),
    };
    let mut shape = shapes[0].to_vec();
    shape[axis] = shapes.iter().map(|s| s[axis]).sum();
    (merged, shape)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::DType;

    fn part(r: usize, shape: &[usize], v: &[f64]) -> Part {
        (r, PathBuf::from(format!("rank{r}.pt")), Tensor::from_f64(shape, v, DType::F32))
    }

    fn whole(want: &'static [usize]) -> impl Fn(&[usize]) -> bool {
        move |s: &[usize]| s == want
    }

    #[test]
    fn each_kind_is_inferred_from_shapes_and_values() {
        let q = Site::parse("model.layers.0.self_attn.q_proj");
        let o = Site::parse("model.layers.0.self_attn.o_proj");
        // Split along the last axis.
        let (t, r) = tensors(
            vec![part(0, &[1, 2, 1], &[1., 3.]), part(1, &[1, 2, 1], &[2., 4.])],
            2,
            &q,
            &whole(&[1, 2, 2]),
            None,
        )
        .unwrap();
        assert_eq!((r.kind.as_str(), t.to_f64_vec()), ("concat(2)", vec![1., 2., 3., 4.]));
        // Split along the token axis (sequence parallel).
        let (t, r) = tensors(
            vec![part(0, &[1, 1, 2], &[1., 2.]), part(1, &[1, 1, 2], &[3., 4.])],
            2,
            &q,
            &whole(&[1, 2, 2]),
            None,
        )
        .unwrap();
        assert_eq!((r.kind.as_str(), t.to_f64_vec()), ("concat(1)", vec![1., 2., 3., 4.]));
        // Whole and identical.
        let (_, r) = tensors(
            vec![part(0, &[1, 2], &[1., 2.]), part(1, &[1, 2], &[1., 2.])],
            2,
            &o,
            &whole(&[1, 2]),
            None,
        )
        .unwrap();
        assert_eq!(r.kind, "replicated");
        // Whole and different after a row-parallel projection: partial sums.
        let (t, r) = tensors(
            vec![part(0, &[1, 2], &[1., 2.]), part(1, &[1, 2], &[-3., 5.])],
            2,
            &o,
            &whole(&[1, 2]),
            None,
        )
        .unwrap();
        assert_eq!((r.kind.as_str(), t.to_f64_vec()), ("sum", vec![-2., 7.]));
        // Key/value heads replicated over pairs of ranks: one rank a pair.
        let k = Site::parse("model.layers.0.self_attn.k_proj");
        let parts = vec![
            part(0, &[1, 1], &[5.]),
            part(1, &[1, 1], &[5.]),
            part(2, &[1, 1], &[6.]),
            part(3, &[1, 1], &[6.]),
        ];
        let (t, r) = tensors(parts, 4, &k, &whole(&[1, 2]), None).unwrap();
        assert_eq!(
            (r.kind.as_str(), t.to_f64_vec()),
            ("concat(1), key/value heads replicated over 2 ranks", vec![5., 6.])
        );
        assert_eq!(r.divergence, None);
        // A vocabulary padded from 4 to 3 over two ranks.
        let lm = Site::LmHead;
        let (t, r) = tensors(
            vec![part(0, &[1, 2], &[1., 2.]), part(1, &[1, 2], &[3., 0.])],
            2,
            &lm,
            &whole(&[1, 3]),
            Some(3),
        )
        .unwrap();
        assert_eq!(
            (r.kind.as_str(), t.to_f64_vec()),
            ("concat(1), vocab padded from 4", vec![1., 2., 3.])
        );
        // One rank of three holds it: a pipeline stage.
        let (_, r) =
            tensors(vec![part(2, &[1, 2], &[1., 2.])], 3, &q, &whole(&[1, 2]), None).unwrap();
        assert_eq!(r.kind, "stage: rank 2");
    }

    #[test]
    fn a_replica_that_differs_is_a_divergence_naming_its_rank() {
        let norm = Site::Norm;
        let parts = vec![
            part(0, &[1, 2], &[1., 2.]),
            part(1, &[1, 2], &[1., 2.]),
            part(2, &[1, 2], &[1., 2.5]),
        ];
        let (t, r) = tensors(parts, 3, &norm, &whole(&[1, 2]), None).unwrap();
        let d = r.divergence.unwrap();
        assert!(d.starts_with("rank divergence: rank 2 (rel-L2"), "{d}");
        assert!(d.contains("from ranks 0, 1"), "{d}");
        assert_eq!(t.to_f64_vec(), vec![1., 2.]);
        // Two ranks of an o_proj a hair apart are a drifted replica, not partial sums.
        let o = Site::parse("model.layers.1.self_attn.o_proj");
        let parts = vec![part(0, &[1, 2], &[1., 2.]), part(1, &[1, 2], &[1., 2.001])];
        let (_, r) = tensors(parts, 2, &o, &whole(&[1, 2]), None).unwrap();
        assert!(r.divergence.unwrap().starts_with("rank divergence: rank 1"));
    }

    /// Statistics of ranks concatenated are those of the whole: [1, 2] and [3, -4, 0]
    /// make [1, 2, 3, -4, 0] (max 3, min -4, mean 0.4, norm sqrt(30)); partial sums get
    /// only the summed Mean.
    #[test]
    fn merged_statistics_are_those_of_the_whole_where_exact() {
        let st = |max: f64, min: f64, mean: f64, norm: f64| Stats {
            max: Some(max),
            min: Some(min),
            mean: Some(mean),
            norm: Some(norm),
        };
        let q = Site::parse("model.layers.0.self_attn.q_proj");
        let parts = vec![
            (0, st(2., 1., 1.5, 5f64.sqrt()), vec![1, 2]),
            (1, st(3., -4., -1. / 3., 25f64.sqrt()), vec![1, 3]),
        ];
        let (s, shape, r) = statistics(&parts, 2, &q, &whole(&[1, 5]), None);
        assert_eq!((shape, r.kind.as_str()), (vec![1, 5], "concat(1)"));
        assert_eq!((s.max, s.min), (Some(3.), Some(-4.)));
        assert!((s.mean.unwrap() - 0.4).abs() < 1e-15);
        assert!((s.norm.unwrap() - 30f64.sqrt()).abs() < 1e-15);
        let o = Site::parse("model.layers.0.mlp");
        let parts =
            vec![(0, st(2., 1., 1.5, 2.), vec![1, 2]), (1, st(3., -4., -1., 5.), vec![1, 2])];
        let (s, _, r) = statistics(&parts, 2, &o, &whole(&[1, 2]), None);
        assert_eq!((r.kind.as_str(), s.mean, s.max, s.norm), ("sum", Some(0.5), None, None));
        assert!(r.inexact.is_some());
        // The same at a norm's output: a divergence naming rank 1.
        let (_, _, r) = statistics(&parts, 2, &Site::Norm, &whole(&[1, 2]), None);
        assert!(r.divergence.unwrap().starts_with("rank divergence: rank 1 (Norm"));
    }

    /// `lm_head` over a vocabulary of 3 padded to 4 (two ranks of 2) or to 6 (three
    /// ranks of 2, the last all padding): the real columns are [1, 2, -3].
    #[test]
    fn padded_vocabulary_statistics_are_cut_taken_as_zero_or_one_sided() {
        let st = |v: &[f64]| Stats {
            max: Some(v.iter().copied().fold(f64::NEG_INFINITY, f64::max)),
            min: Some(v.iter().copied().fold(f64::INFINITY, f64::min)),
            mean: Some(v.iter().sum::<f64>() / v.len() as f64),
            norm: Some(v.iter().map(|x| x * x).sum::<f64>().sqrt()),
        };
        let lm = Site::LmHead;
        let fits = whole(&[1, 3]);
        // Padding of unknown value (7) beside rank 1's real column: one-sided.
        let parts = vec![(0, st(&[1., 2.]), vec![1, 2]), (1, st(&[-3., 7.]), vec![1, 2])];
        let (s, shape, r) = statistics(&parts, 2, &lm, &fits, Some(3));
        assert_eq!((shape, r.kind.as_str()), (vec![1, 3], "concat(1), vocab padded from 4"));
        assert!(r.one_sided);
        assert_eq!((s.max, s.min, s.mean), (Some(7.), Some(-3.), None));
        assert!((s.norm.unwrap() - 63f64.sqrt()).abs() < 1e-12);
        assert!(r.inexact.unwrap().contains("rank 1's statistics count its 1 padding columns"));
        // A third rank of padding alone, recording zeros: cut, and rank 1's padding taken
        // as zero: the Mean and Norm of [1, 2, -3], the Max (2 > 0) and Min (-3 < 0) too.
        let parts = vec![
            (0, st(&[1., 2.]), vec![1, 2]),
            (1, st(&[-3., 0.]), vec![1, 2]),
            (2, st(&[0., 0.]), vec![1, 2]),
        ];
        let (s, shape, r) = statistics(&parts, 3, &lm, &fits, Some(3));
        assert_eq!(shape, vec![1, 3]);
        assert_eq!(r.kind, "concat(1), vocab padded from 6 (rank 2 holding only padding cut)");
        assert!(!r.one_sided);
        assert!(r.inexact.unwrap().contains("taken as zero"));
        assert_eq!((s.max, s.min), (Some(2.), Some(-3.)));
        assert!(s.mean.unwrap().abs() < 1e-15);
        assert!((s.norm.unwrap() - 14f64.sqrt()).abs() < 1e-12);
        // Padding that fills whole ranks only: cut, exact.
        let fits2 = whole(&[1, 4]);
        let parts = vec![
            (0, st(&[1., 2.]), vec![1, 2]),
            (1, st(&[-3., 5.]), vec![1, 2]),
            (2, st(&[9., 9.]), vec![1, 2]),
        ];
        let (s, _, r) = statistics(&parts, 3, &lm, &fits2, Some(4));
        assert_eq!(r.kind, "concat(1), vocab padded from 6 (rank 2 holding only padding cut)");
        assert_eq!((r.inexact, r.one_sided, s.max, s.min), (None, false, Some(5.), Some(-3.)));
        assert!((s.mean.unwrap() - 1.25).abs() < 1e-15);
    }
}

//! msprobe dumps laid out other ways than one rank with separate q/k/v projections,
//! built at test time from the committed real dumps (`fixtures/msprobe/`): a dump
//! split over two tensor-parallel ranks (`step*/rank0`, `rank1`) and a dump whose q/k/v
//! projections are one fused module (and, for tests/tensor_parallel.rs, the writer of
//! any split over ranks, `make_ranks`). Each must import to exactly the tensors of the
//! single-rank dump and get the same verdict; broken ones exit 2 naming the file.
//!
//! Split or fused tensors are written as `.npy` files (the reader takes `.pt` and
//! `.npy` alike, by extension); every other record keeps msprobe's own `.pt` file.

use std::path::{Path, PathBuf};

use crate::helpers::{compare_report, copy_tree, parity, root};
use crate::msprobe::assert_refused;
use llama_parity::dump::msprobe::pt;
use llama_parity::dump::{DType, Dump, Tensor};
use serde_json::{json, Value};

/// `parity compare GOLDEN CANDIDATE --msprobe-map MAP --report TMP`: (exit code,
/// (first divergence step, site), report.json).
fn compare(candidate: &Path, map: &Path) -> (Option<i32>, (String, String), Value) {
    let tmp = tempfile::tempdir().unwrap();
    let rep = tmp.path().join("r");
    let args = ["--msprobe-map", map.to_str().unwrap()];
    let (code, r, _) = compare_report("golden/gqa_pad_f32", candidate, &rep, &args);
    let f = &r["first_divergence"];
    let first = (f["step"].as_str().unwrap_or("").into(), f["site"].as_str().unwrap_or("").into());
    (code, first, r)
}

/// `parity compare golden/gqa_pad_f32 DUMP --msprobe-map MAP`, which must exit 2: its
/// stderr.
pub(crate) fn refused_with_map(dump: &Path, map: &Path) -> String {
    let (code, _, err) = parity(&[
        "compare",
        "golden/gqa_pad_f32",
        dump.to_str().unwrap(),
        "--msprobe-map",
        map.to_str().unwrap(),
    ]);
    assert_eq!(code, Some(2), "{err}");
    err
}

/// `parity import msprobe DUMP --msprobe-map MAP --out DIR` (exit 0), opened.
pub(crate) fn import(dump: &Path, map: &Path, out: &Path) -> Dump {
    let (code, _, err) = parity(&[
        "import",
        "msprobe",
        dump.to_str().unwrap(),
        "--msprobe-map",
        map.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    assert_eq!(code, Some(0), "{err}");
    Dump::open(out).unwrap()
}

/// Every tensor of `a` equals `b`'s byte for byte, and they hold the same sites.
fn assert_same_tensors(a: &Dump, b: &Dump, what: &str) {
    assert_eq!(a.manifest.steps, b.manifest.steps, "{what}");
    for &step in &a.manifest.steps {
        assert_eq!(a.sites(step), b.sites(step), "{what}: {step}");
        for site in a.sites(step) {
            let (x, y) = (a.get(step, site).unwrap().unwrap(), b.get(step, site).unwrap().unwrap());
            assert_eq!((x.shape(), x.dtype()), (y.shape(), y.dtype()), "{what}: {step}/{site}");
            assert!(x.bytes() == y.bytes(), "{what}: {step}/{site} differs");
        }
    }
}

/// The shipped HF map with `edit` applied to its rules, written to `dir/name`.
pub(crate) fn hf_map(dir: &Path, name: &str, edit: impl Fn(&mut Vec<Value>)) -> PathBuf {
    let mut m: Value =
        serde_json::from_str(include_str!("../harness/dump/src/msprobe/maps/hf.json")).unwrap();
    edit(m["sites"].as_array_mut().unwrap());
    let p = dir.join(name);
    std::fs::write(&p, serde_json::to_string_pretty(&m).unwrap()).unwrap();
    p
}

/// A fused q/k/v projection's rules: each site suffix read from `self_attn.qkv_proj`'s
/// part of it.
pub(crate) const FUSED_QKV: [(&str, (&str, &str, &str)); 3] = [
    ("self_attn.q_proj", ("self_attn.qkv_proj", "fused_qkv", "q")),
    ("self_attn.k_proj", ("self_attn.qkv_proj", "fused_qkv", "k")),
    ("self_attn.v_proj", ("self_attn.qkv_proj", "fused_qkv", "v")),
];

/// The shipped HF map with each rule whose site ends in a key of `fused` read from a
/// fused module instead: `(site suffix, (module suffix, field, part))`, the layout given;
/// written to `dir/name`.
pub(crate) fn fused_hf_map(
    dir: &Path,
    name: &str,
    fused: &[(&str, (&str, &str, &str))],
    layout: &str,
) -> PathBuf {
    hf_map(dir, name, |rules| {
        for r in rules.iter_mut() {
            let site = r["site"].as_str().unwrap().to_string();
            for (suffix, (module, field, part)) in fused {
                if site == format!("model.layers.{{i}}.{suffix}") {
                    r["module"] = json!(format!("model.layers.{{i}}.{module}"));
                    r[*field] = json!(part);
                    r["fused_layout"] = json!(layout);
                }
            }
        }
    })
}

/// msprobe's dump.json (Python's bare NaN/Infinity quoted as strings, as the reader
/// accepts them).
pub(crate) fn read_dump_json(p: &Path) -> Value {
    let t = std::fs::read_to_string(p).unwrap();
    let t = t
        .replace(": -Infinity", ": \"-Infinity\"")
        .replace(": Infinity", ": \"Infinity\"")
        .replace(": NaN", ": \"NaN\"");
    serde_json::from_str(&t).unwrap()
}

/// A little-endian `.npy` file of `t`.
pub(crate) fn write_npy(path: &Path, t: &Tensor) {
    let descr = match t.dtype() {
        DType::F32 => "<f4",
        DType::I64 => "<i8",
        other => panic!("no .npy descr for {other:?} in this test"),
    };
    let dims: Vec<String> = t.shape().iter().map(|d| d.to_string()).collect();
    let shape =
        if dims.len() == 1 { format!("({},)", dims[0]) } else { format!("({})", dims.join(", ")) };
    let mut header = format!("{{'descr': '{descr}', 'fortran_order': False, 'shape': {shape}, }}");
    while (10 + header.len() + 1) % 64 != 0 {
        header.push(' ');
    }
    header.push('\n');
    let mut bytes = b"\x93NUMPY\x01\x00".to_vec();
    bytes.extend_from_slice(&(header.len() as u16).to_le_bytes());
    bytes.extend_from_slice(header.as_bytes());
    bytes.extend_from_slice(t.bytes());
    std::fs::write(path, bytes).unwrap();
}

/// `t`'s slice `[from, to)` along `axis`.
pub(crate) fn slice(t: &Tensor, axis: usize, from: usize, to: usize) -> Tensor {
    let shape = t.shape();
    let v = t.to_f64_vec();
    let inner: usize = shape[axis + 1..].iter().product();
    let outer: usize = shape[..axis].iter().product();
    let mut out = Vec::new();
    for o in 0..outer {
        let base = o * shape[axis] * inner;
        out.extend_from_slice(&v[base + from * inner..base + to * inner]);
    }
    let mut s = shape.to_vec();
    s[axis] = to - from;
    Tensor::from_f64(&s, &out, t.dtype())
}

/// The tensors concatenated along their last axis.
pub(crate) fn concat_last(ts: &[Tensor]) -> Tensor {
    let shape = ts[0].shape();
    let axis = shape.len() - 1;
    let rows: usize = shape[..axis].iter().product();
    let vs: Vec<Vec<f64>> = ts.iter().map(|t| t.to_f64_vec()).collect();
    let mut out = Vec::new();
    for r in 0..rows {
        for (t, v) in ts.iter().zip(&vs) {
            let w = t.shape()[axis];
            out.extend_from_slice(&v[r * w..(r + 1) * w]);
        }
    }
    let mut s = shape.to_vec();
    s[axis] = ts.iter().map(|t| t.shape()[axis]).sum();
    Tensor::from_f64(&s, &out, ts[0].dtype())
}

/// An f32 tensor as two exact partial sums `(hi, lo)`, `hi + lo == t`: `hi` keeps the
/// top 16 bits of each value, `lo` the rest (exact: same sign and exponent).
pub(crate) fn partial_sums(t: &Tensor) -> (Tensor, Tensor) {
    let v: Vec<f32> =
        t.bytes().chunks(4).map(|b| f32::from_le_bytes(b.try_into().unwrap())).collect();
    let hi: Vec<f64> =
        v.iter().map(|x| f64::from(f32::from_bits(x.to_bits() & 0xffff_0000))).collect();
    let lo: Vec<f64> = v.iter().zip(&hi).map(|(x, h)| f64::from(x - *h as f32)).collect();
    (Tensor::from_f64(t.shape(), &hi, DType::F32), Tensor::from_f64(t.shape(), &lo, DType::F32))
}

/// How one tensor record is split over two ranks.
#[derive(Clone, Copy)]
enum Split {
    Concat(usize),
    Sum,
}

/// Which records of the single-rank dump a tensor-parallel port over two ranks holds
/// split, and how: column-parallel q/k/v projections and lm_head (last axis), the
/// attention heads (axis 1 of the matmul operands and the softmax), o_proj's input;
/// row-parallel partial sums for o_proj, the MLP and the vocabulary-parallel embedding.
fn tp_split(entry: &str, take: &str) -> Option<Split> {
    let module = |m: &str| entry.contains(&format!(".{m}.")) && entry.starts_with("Module.");
    match take {
        "output.0" if module("q_proj") || module("k_proj") || module("v_proj") => {
            Some(Split::Concat(2))
        }
        "output.0" if entry.starts_with("Module.lm_head.") => Some(Split::Concat(2)),
        "input.0" if module("o_proj") => Some(Split::Concat(2)),
        "output.0" if module("o_proj") || entry.contains(".mlp.LlamaMLP.") => Some(Split::Sum),
        "output.0" if entry.starts_with("Module.model.embed_tokens.") => Some(Split::Sum),
        "input.0" | "input.1" if entry.starts_with("Torch.matmul.") => Some(Split::Concat(1)),
        "output.0" if entry.starts_with("Functional.softmax.") => Some(Split::Concat(1)),
        _ => None,
    }
}

/// The site map's rules for the same tensor-parallel layout.
fn tp_ranks(site: &str) -> Option<&'static str> {
    let s = site.trim_start_matches("model.layers.{i}.");
    Some(match s {
        "self_attn.q_proj" | "self_attn.k_proj" | "self_attn.v_proj" | "self_attn.context" => {
            "concat(2)"
        }
        "lm_head" => "concat(2)",
        "self_attn.q_rope" | "self_attn.k_cache" | "self_attn.v_cache" | "self_attn.probs" => {
            "concat(1)"
        }
        "self_attn.o_proj" | "mlp" | "model.embed_tokens" => "sum",
        _ => return None,
    })
}

/// Visits every tensor record of a dump.json's data: (entry, "input.K" / "output.K" /
/// "kwargs.NAME", record).
pub(crate) fn for_each_record(
    data: &mut serde_json::Map<String, Value>,
    mut f: impl FnMut(&str, &str, &mut Value),
) {
    for (entry, e) in data.iter_mut() {
        for (key, kind) in [("input_args", "input"), ("output", "output")] {
            match e.get_mut(key) {
                Some(Value::Array(a)) => {
                    for (k, r) in a.iter_mut().enumerate() {
                        f(entry, &format!("{kind}.{k}"), r);
                    }
                }
                Some(r @ Value::Object(_)) => f(entry, &format!("{kind}.0"), r),
                _ => {}
            }
        }
        if let Some(Value::Object(kw)) = e.get_mut("input_kwargs") {
            for (name, r) in kw.iter_mut() {
                f(entry, &format!("kwargs.{name}"), r);
            }
        }
    }
}

/// Writes `src` (a single-rank msprobe dump) split over two ranks into `dst`:
/// `step*/rank0`, `rank1`, each with the records `tp_split` names split (rank r holds
/// half r of the axis, or partial sum r) as `.npy` files, every other record copied.
/// `break_rank1` may change rank 1's piece of one record (shape and data both).
pub(crate) fn split_over_two_ranks(src: &Path, dst: &Path, break_rank1: Option<(&str, &str)>) {
    make_ranks(
        src,
        dst,
        2,
        Records::Tensors,
        |_, _, _| true,
        |r, entry, take, t| {
            let mut piece = match tp_split(entry, take)? {
                Split::Concat(axis) => {
                    let half = t.shape()[axis] / 2;
                    slice(t, axis, r * half, (r + 1) * half)
                }
                Split::Sum => {
                    let (hi, lo) = partial_sums(t);
                    [hi, lo][r].clone()
                }
            };
            if r == 1 && break_rank1 == Some((entry, take)) {
                piece = slice(&piece, 1, 0, piece.shape()[1] - 1);
            }
            Some(piece)
        },
    );
}

/// The Max, Min, Mean and Norm msprobe records of a tensor (computed in float64).
fn stats_of(t: &Tensor) -> (f64, f64, f64, f64) {
    let v = t.to_f64_vec();
    let max = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let min = v.iter().copied().fold(f64::INFINITY, f64::min);
    let mean = v.iter().sum::<f64>() / v.len() as f64;
    let norm = v.iter().map(|x| x * x).sum::<f64>().sqrt();
    (max, min, mean, norm)
}

/// What each rank's records hold in a dump [`make_ranks`] writes.
#[derive(Clone, Copy, PartialEq)]
pub(crate) enum Records {
    /// Tensor files: msprobe's own for a whole record, `.npy` for a piece.
    Tensors,
    /// No tensor files (a statistics-mode dump): each whole record keeps msprobe's own
    /// statistics and each piece gets its own.
    Statistics,
}

/// Writes the real single-rank dump `src` as `k` ranks into `dst`, their records as
/// `records` says: `keep(rank, entry, parent)` says whether a rank holds an entry at
/// all; `piece(rank, entry, take, t)` gives its piece of a record (`None`: the whole
/// tensor, msprobe's own file).
pub(crate) fn make_ranks(
    src: &Path,
    dst: &Path,
    k: usize,
    records: Records,
    keep: impl Fn(usize, &str, &str) -> bool,
    piece: impl Fn(usize, &str, &str, &Tensor) -> Option<Tensor>,
) {
    let statistics = records == Records::Statistics;
    std::fs::create_dir_all(dst).unwrap();
    std::fs::copy(src.join("manifest.json"), dst.join("manifest.json")).unwrap();
    for step in std::fs::read_dir(src).unwrap().map(|e| e.unwrap().path()) {
        if !step.is_dir() {
            continue;
        }
        let proc = std::fs::read_dir(&step).unwrap().next().unwrap().unwrap().path();
        let djson = read_dump_json(&proc.join("dump.json"));
        let construct = read_dump_json(&proc.join("construct.json"));
        for r in 0..k {
            let out = dst.join(step.file_name().unwrap()).join(format!("rank{r}"));
            let data_dir = out.join("dump_tensor_data");
            std::fs::create_dir_all(&data_dir).unwrap();
            std::fs::copy(proc.join("construct.json"), out.join("construct.json")).unwrap();
            let mut d = djson.clone();
            if statistics {
                d["task"] = json!("statistics");
            }
            let data = d["data"].as_object_mut().unwrap();
            data.retain(|entry, _| keep(r, entry, construct[entry].as_str().unwrap_or("")));
            for_each_record(data, |entry, take, rec| {
                let Some(name) = rec.get("data_name").and_then(Value::as_str).map(str::to_string)
                else {
                    return;
                };
                let from = proc.join("dump_tensor_data").join(&name);
                match (piece(r, entry, take, &pt::read(&from).unwrap()), statistics) {
                    (None, false) => {
                        std::fs::copy(&from, data_dir.join(&name)).unwrap();
                    }
                    (Some(p), false) => {
                        let npy = name.replace(".pt", ".npy");
                        write_npy(&data_dir.join(&npy), &p);
                        rec["data_name"] = json!(npy);
                        rec["shape"] = json!(p.shape());
                    }
                    (None, true) => {
                        rec.as_object_mut().unwrap().remove("data_name");
                    }
                    (Some(p), true) => {
                        let (max, min, mean, norm) = stats_of(&p);
                        let o = rec.as_object_mut().unwrap();
                        o.remove("data_name");
                        o.insert("shape".into(), json!(p.shape()));
                        for (key, v) in [("Max", max), ("Min", min), ("Mean", mean), ("Norm", norm)]
                        {
                            o.insert(key.into(), json!(v));
                        }
                    }
                }
            });
            std::fs::write(out.join("dump.json"), serde_json::to_string(&d).unwrap()).unwrap();
        }
    }
}

const CORRECT: &str = "fixtures/msprobe/gqa_pad_f32";
const POS_RESET: &str = "fixtures/msprobe/gqa_pad_f32__rope_pos_reset";

fn tp_map(dir: &Path) -> PathBuf {
    hf_map(dir, "tp.json", |rules| {
        for r in rules.iter_mut() {
            if let Some(ranks) = tp_ranks(r["site"].as_str().unwrap()) {
                r["ranks"] = json!(ranks);
            }
        }
    })
}

#[test]
fn a_dump_split_over_two_ranks_is_reassembled_and_judged_like_the_single_rank_dump() {
    let tmp = tempfile::tempdir().unwrap();
    let map = tp_map(tmp.path());
    let hf = tmp.path().join("hf.json");
    std::fs::write(&hf, include_str!("../harness/dump/src/msprobe/maps/hf.json")).unwrap();
    for src in [CORRECT, POS_RESET] {
        let split = tmp.path().join(Path::new(src).file_name().unwrap());
        split_over_two_ranks(&root().join(src), &split, None);
        assert!(split.join("step0/rank1/dump.json").is_file());
        // Reassembled: exactly the single-rank dump's tensors.
        let whole = import(&root().join(src), &hf, &tmp.path().join("whole"));
        let joined = import(&split, &map, &tmp.path().join("joined"));
        assert_same_tensors(&joined, &whole, src);
        std::fs::remove_dir_all(tmp.path().join("whole")).unwrap();
        std::fs::remove_dir_all(tmp.path().join("joined")).unwrap();
        // The same verdict and first divergence as the single-rank dump.
        let (c1, f1, r1) = compare(&root().join(src), &hf);
        let (c2, f2, r2) = compare(&split, &map);
        assert_eq!((c2, &f2), (c1, &f1), "{src}");
        assert_eq!(r2["summary"], r1["summary"], "{src}");
    }
    // Read with the plain map (no `ranks`), the reassembly is inferred from the ranks
    // (tests/tensor_parallel.rs); a map's `ranks` still overrides it: q_proj's halves
    // declared partial sums are added and fail.
    let (code, _, r) = compare(&tmp.path().join("gqa_pad_f32"), &hf);
    assert_eq!(code, Some(0));
    assert_eq!(r["summary"]["fail"], 0);
    let wrong = hf_map(tmp.path(), "wrong.json", |rules| {
        for r in rules.iter_mut() {
            if r["site"] == "model.layers.{i}.self_attn.q_proj" {
                r["ranks"] = json!("sum");
            }
        }
    });
    let (code, first, _) = compare(&tmp.path().join("gqa_pad_f32"), &wrong);
    assert_eq!(code, Some(1));
    assert_eq!(first, ("prefill".to_string(), "model.layers.0.self_attn.q_proj".to_string()));
}

#[test]
fn ranks_that_disagree_in_shape_exit_2_naming_the_file() {
    let tmp = tempfile::tempdir().unwrap();
    let map = tp_map(tmp.path());
    let dump = tmp.path().join("dump");
    let entry = "Module.model.layers.1.self_attn.q_proj.Linear.forward.0";
    split_over_two_ranks(&root().join(CORRECT), &dump, Some((entry, "output.0")));
    let file = dump.join(format!("step0/rank1/dump_tensor_data/{entry}.output.0.npy"));
    assert!(file.is_file());
    let extra = ["--msprobe-map", map.to_str().unwrap()];
    assert_refused(&dump, &extra, &tmp.path().join("o"), &file, "ranks disagree");
    // A rank folder missing from one step, and rank folders not numbered from 0.
    std::fs::remove_dir_all(dump.join("step1/rank1")).unwrap();
    let (code, _, err) = parity(&["compare", "golden/gqa_pad_f32", dump.to_str().unwrap()]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("step1") && err.contains("number of ranks"), "{err}");
    std::fs::rename(dump.join("step0/rank1"), dump.join("step0/rank2")).unwrap();
    let (code, _, err) = parity(&["compare", "golden/gqa_pad_f32", dump.to_str().unwrap()]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("step0") && err.contains("not numbered rank0..rank1"), "{err}");
}

/// Writes `src` with each layer's q/k/v projections fused into one module
/// `self_attn.qkv_proj` whose output is `[q | k | v]` (`Blocks`) or one group per
/// key/value head (`Groups`: its query heads, k, v), the separate projections removed.
fn fuse_qkv(src: &Path, dst: &Path, groups: bool, drop_v: bool) {
    let (q_heads, kv_heads, d) = (8, 2, 8); // golden/gqa_pad_f32
    copy_tree(src, dst);
    for step in std::fs::read_dir(dst).unwrap().map(|e| e.unwrap().path()) {
        if !step.is_dir() {
            continue;
        }
        let proc = std::fs::read_dir(&step).unwrap().next().unwrap().unwrap().path();
        let data_dir = proc.join("dump_tensor_data");
        let mut djson = read_dump_json(&proc.join("dump.json"));
        let data = djson["data"].as_object_mut().unwrap();
        for i in 0..2 {
            let name = |p: &str| format!("Module.model.layers.{i}.self_attn.{p}.Linear.forward.0");
            let mut parts = Vec::new();
            for p in ["q_proj", "k_proj", "v_proj"] {
                let e = data.remove(&name(p)).unwrap();
                let rec = &e["output"][0];
                let f = data_dir.join(rec["data_name"].as_str().unwrap());
                parts.push(pt::read(&f).unwrap());
            }
            let head = |t: &Tensor, h: usize| slice(t, 2, h * d, (h + 1) * d);
            let mut cols = Vec::new();
            if groups {
                let rep = q_heads / kv_heads;
                for g in 0..kv_heads {
                    cols.extend((0..rep).map(|j| head(&parts[0], g * rep + j)));
                    cols.push(head(&parts[1], g));
                    cols.push(head(&parts[2], g));
                }
            } else {
                cols.extend(parts.iter().take(if drop_v { 2 } else { 3 }).cloned());
            }
            let fused = concat_last(&cols);
            let file = format!("{}.output.0.npy", name("qkv_proj"));
            write_npy(&data_dir.join(&file), &fused);
            let out = json!({"type": "torch.Tensor", "dtype": "torch.float32",
                             "shape": fused.shape(), "data_name": file});
            data.insert(
                name("qkv_proj"),
                json!({"input_args": [], "input_kwargs": {}, "output": [out]}),
            );
        }
        std::fs::write(proc.join("dump.json"), serde_json::to_string(&djson).unwrap()).unwrap();
    }
}

fn fused_map(dir: &Path, layout: &str) -> PathBuf {
    fused_hf_map(dir, &format!("fused_{layout}.json"), &FUSED_QKV, layout)
}

#[test]
fn a_fused_qkv_projection_is_split_by_the_golden_head_counts_in_either_layout() {
    let tmp = tempfile::tempdir().unwrap();
    let hf = tmp.path().join("hf.json");
    std::fs::write(&hf, include_str!("../harness/dump/src/msprobe/maps/hf.json")).unwrap();
    let whole = import(&root().join(CORRECT), &hf, &tmp.path().join("whole"));
    let (_, _, single) = compare(&root().join(CORRECT), &hf);
    for (layout, groups) in [("blocks", false), ("groups", true)] {
        let dump = tmp.path().join(format!("fused_{layout}"));
        fuse_qkv(&root().join(CORRECT), &dump, groups, false);
        let map = fused_map(tmp.path(), layout);
        let imported = import(&dump, &map, &tmp.path().join(format!("imp_{layout}")));
        assert_same_tensors(&imported, &whole, layout);
        let (code, _, rep) = compare(&dump, &map);
        assert_eq!(code, Some(0), "{layout}: {}", rep["summary"]);
        assert_eq!(rep["summary"], single["summary"], "{layout}");
        // The blocks dump read as groups splits the heads wrongly: it fails at q_proj.
        if layout == "blocks" {
            let (code, first, _) = compare(&dump, &fused_map(tmp.path(), "groups"));
            assert_eq!(code, Some(1));
            assert_eq!(first, ("prefill".into(), "model.layers.0.self_attn.q_proj".into()));
        }
    }
    // A fused tensor that does not hold (nH + 2·nKV)·D columns: exit 2, naming it.
    let dump = tmp.path().join("fused_short");
    fuse_qkv(&root().join(CORRECT), &dump, false, true);
    let map = fused_map(tmp.path(), "blocks");
    let err = refused_with_map(&dump, &map);
    assert_eq!(err.lines().count(), 1, "{err}");
    let file = "step0/proc0/dump_tensor_data/Module.model.layers.0.self_attn.qkv_proj.Linear.forward.0.output.0.npy";
    assert!(err.contains(dump.join(file).to_str().unwrap()), "{err}");
    assert!(err.contains("(8 + 2 x 2) heads x 8 = 96"), "{err}");
}

/// The golden given as an msprobe dump of HF's run (with its manifest.json): the
/// pair msprobe's own compare takes. The correct dump against itself passes; the
/// faulty one fails where it fails against the contract golden.
#[test]
fn an_msprobe_dump_can_be_the_golden() {
    let (code, out, err) = parity(&["compare", CORRECT, CORRECT]);
    assert_eq!(code, Some(0), "{out}{err}");
    let (code, out, _) = parity(&["compare", CORRECT, POS_RESET]);
    assert_eq!(code, Some(1));
    assert!(out.contains("first divergence: decode.0 inputs.position_ids"), "{out}");
    // Without a manifest.json beside the steps: exit 2, naming the dump.
    let tmp = tempfile::tempdir().unwrap();
    let g = tmp.path().join("g");
    copy_tree(&root().join(CORRECT), &g);
    std::fs::remove_file(g.join("manifest.json")).unwrap();
    let (code, _, err) = parity(&["compare", g.to_str().unwrap(), CORRECT]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains(g.to_str().unwrap()) && err.contains("manifest.json"), "{err}");
    let (code, _, err) = parity(&["compare", "fixtures/msprobe/stats/gqa_pad_f32", CORRECT]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("statistics-mode msprobe dump cannot be the golden"), "{err}");
}

//! Tensor-parallel msprobe dumps (`step*/rank<R>/`) compared with a single-device golden,
//! no map given: each site's ranks are put back together as the dump shows them
//! (`dump::msprobe::ranks`), and the report names the kind per site.
//!
//! Real dumps: HF transformers' own tensor parallelism (`tp_plan="auto"`, gloo, CPU)
//! under msprobe 26.2 at 2 and 4 ranks, made by `fixtures/msprobe/make_tp_dumps.py`.
//! Real MindSpore runs too: the repository's MindSpore port over 2 ranks under `msrun`,
//! one contract dump per rank (`fixtures/tp/make_mindspore_tp_dumps.py`).
//! Labelled synthetic dumps, made at test time (`msprobe_layouts::make_ranks`) from real
//! single-rank dumps (`fixtures/msprobe/gqa_pad_f32`, `fixtures/msprobe/mlp/gqa_pad_f32`)
//! where HF's plan cannot make the layout: key/value heads replicated over ranks, a padded vocabulary
//! (tensors and statistics), sequence-parallel norms, a vocabulary-parallel embedding's
//! partial sums, fused q/k/v and fused gate/up shards, and pipeline stages.

use std::path::Path;

use crate::helpers::{compare_report, parity, root};
use crate::msprobe_layouts::{
    fused_hf_map, import, make_ranks, partial_sums, read_dump_json, refused_with_map, slice,
    split_over_two_ranks, write_npy, Records, FUSED_QKV,
};
use llama_parity::contract::site::Site;
use llama_parity::dump::msprobe::pt;
use llama_parity::dump::{DType, Tensor};
use serde_json::{json, Value};

const TP: &str = "fixtures/msprobe/tp";

/// `parity compare GOLDEN CANDIDATE --report DIR`: (exit code, report.json, stderr).
fn compare(golden: &str, candidate: &Path, report: &Path) -> (Option<i32>, Value, String) {
    compare_report(golden, candidate, report, &[])
}

/// `parity compare GOLDEN CANDIDATE --msprobe-map MAP --report DIR`.
fn compare_mapped(
    golden: &str,
    candidate: &Path,
    map: &Path,
    report: &Path,
) -> (Option<i32>, Value, String) {
    compare_report(golden, candidate, report, &["--msprobe-map", map.to_str().unwrap()])
}

/// The site entry of `report` at `step`/`site`.
fn entry<'a>(report: &'a Value, step: &str, site: &str) -> &'a Value {
    report["sites"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["step"] == step && e["site"] == site)
        .unwrap_or_else(|| panic!("no site {step}/{site} in the report"))
}

fn kind<'a>(report: &'a Value, step: &str, site: &str) -> &'a str {
    entry(report, step, site)["reassembly"].as_str().unwrap_or("")
}

/// Each prefill site of `report` as `site status kind`, to show where a check fails.
fn prefill_kinds(report: &Value) -> Vec<String> {
    report["sites"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["step"] == "prefill")
        .map(|e| format!("{} {} {}", e["site"], e["status"], e["reassembly"]))
        .collect()
}

/// Compares `dump`, a run of golden/gqa_pad_f32 with rope.pos_reset planted, with that
/// golden, the report written into `report`: it exits 1 with its first divergence where
/// the fault first shows, decode.0's position ids. Returns the report.
fn assert_pos_reset_found(dump: &Path, report: &Path) -> Value {
    let (code, r, err) = compare("golden/gqa_pad_f32", dump, report);
    assert_eq!(code, Some(1), "{err}");
    let fd = &r["first_divergence"];
    assert_eq!(
        (fd["step"].as_str(), fd["site"].as_str()),
        (Some("decode.0"), Some("inputs.position_ids"))
    );
    r
}

/// Compares `dump` with golden/gqa_pad_f32, the report written into `report`: it exits 1
/// with its first divergence at `site`, a rank divergence whose note starts with `note`.
/// Returns the report.
fn assert_rank_divergence(dump: &Path, report: &Path, site: &str, note: &str) -> Value {
    let (code, r, err) = compare("golden/gqa_pad_f32", dump, report);
    assert_eq!(code, Some(1), "{err}");
    let fd = &r["first_divergence"];
    assert_eq!(fd["site"], site, "{fd}");
    let got = fd["note"].as_str().unwrap();
    assert!(got.starts_with(note), "{got}");
    r
}

/// Every site the candidate holds names its kind; none failed.
fn assert_passes_with_kinds(report: &Value, what: &str) {
    assert_eq!(report["verdict"], "pass", "{what}");
    assert_eq!(report["summary"]["fail"], 0, "{what}");
    assert!(report["summary"]["pass"].as_u64().unwrap() >= 35, "{what}");
    for e in report["sites"].as_array().unwrap() {
        let held = e["status"] == "pass";
        let derived = e["site"].as_str().unwrap().ends_with("k_rope");
        if held && !derived {
            assert!(e["reassembly"].is_string(), "{what}: {} {} has no kind", e["step"], e["site"]);
        }
    }
}

#[test]
fn real_hf_tensor_parallel_dumps_at_2_and_4_ranks_pass_with_no_map() {
    let tmp = tempfile::tempdir().unwrap();
    for (dump, golden) in [
        ("tp2/gqa_pad_f32", "golden/gqa_pad_f32"),
        ("tp4/mha_f32", "golden/mha_f32"),
        ("tp2/stats/gqa_pad_f32", "golden/gqa_pad_f32"),
        ("tp4/stats/mha_f32", "golden/mha_f32"),
    ] {
        let rep = tmp.path().join(dump);
        let (code, r, err) = compare(golden, &root().join(TP).join(dump), &rep);
        assert_eq!(code, Some(0), "{dump}: {err}");
        assert_passes_with_kinds(&r, dump);
        // HF's plan: column-parallel projections, heads split, all-reduced outputs.
        for (site, want) in [
            ("model.layers.0.self_attn.q_proj", "concat(2)"),
            ("model.layers.1.self_attn.k_proj", "concat(2)"),
            ("model.layers.0.self_attn.context", "concat(2)"),
            ("model.layers.0.self_attn.k_cache", "concat(1)"),
            ("model.layers.1.self_attn.probs", "concat(1)"),
            ("model.layers.0.self_attn.o_proj", "replicated"),
            ("model.layers.1.mlp", "replicated"),
            ("model.embed_tokens", "replicated"),
            ("lm_head", "replicated"),
        ] {
            assert_eq!(kind(&r, "prefill", site), want, "{dump}: {site}");
        }
        assert_eq!(r["candidate_producer"]["ranks"], if dump.contains("tp4") { 4 } else { 2 });
        // The kinds are in the HTML and Markdown reports too.
        let md = std::fs::read_to_string(rep.join("summary.md")).unwrap();
        assert!(md.contains("Ranks: sites put back together from the ranks as: "), "{md}");
        let html = std::fs::read_to_string(rep.join("report.html")).unwrap();
        assert!(html.contains("ranks: concat(2)"), "{dump}: html");
    }
}

#[test]
fn a_fault_planted_in_the_tensor_parallel_run_fails_at_its_first_site_and_is_named() {
    let tmp = tempfile::tempdir().unwrap();
    let dump = root().join(TP).join("tp2/gqa_pad_f32__rope_pos_reset");
    let r = assert_pos_reset_found(&dump, &tmp.path().join("t"));
    assert_eq!(r["diagnosis"][0]["fault"], "rope.pos_reset", "{}", r["diagnosis"]);
    // Statistics mode: the same first site (no diagnosis from statistics).
    let dump = root().join(TP).join("tp2/stats/gqa_pad_f32__rope_pos_reset");
    assert_pos_reset_found(&dump, &tmp.path().join("s"));
}

/// Writes a copy of the real tensor-parallel dump `src` with rank `rank`'s tensor of
/// `entry`'s `take` at step 0 changed by `f`.
fn change_rank(
    src: &Path,
    dst: &Path,
    rank: usize,
    entry: &str,
    take: &str,
    f: impl Fn(&mut Vec<f64>),
) {
    crate::helpers::copy_tree(src, dst);
    let dir = dst.join(format!("step0/rank{rank}"));
    let mut d = read_dump_json(&dir.join("dump.json"));
    let (kind, k) = take.split_once('.').unwrap();
    let key = if kind == "input" { "input_args" } else { "output" };
    let rec = &mut d["data"][entry][key][k.parse::<usize>().unwrap()];
    let name = rec["data_name"].as_str().unwrap().to_string();
    let t = pt::read(&dir.join("dump_tensor_data").join(&name)).unwrap();
    let mut v = t.to_f64_vec();
    f(&mut v);
    let npy = name.replace(".pt", ".npy");
    write_npy(
        &dir.join("dump_tensor_data").join(&npy),
        &Tensor::from_f64(t.shape(), &v, t.dtype()),
    );
    rec["data_name"] = json!(npy);
    std::fs::write(dir.join("dump.json"), serde_json::to_string(&d).unwrap()).unwrap();
}

#[test]
fn a_rank_that_diverges_from_its_replicas_fails_its_site_with_the_rank_named() {
    let tmp = tempfile::tempdir().unwrap();
    let src = root().join(TP).join("tp2/gqa_pad_f32");
    // A replicated norm output, one value off on rank 1.
    let dump = tmp.path().join("norm");
    let e = "Module.model.layers.0.input_layernorm.LlamaRMSNorm.forward.0";
    change_rank(&src, &dump, 1, e, "output.0", |v| v[5] += 0.25);
    let r = assert_rank_divergence(
        &dump,
        &tmp.path().join("r1"),
        "model.layers.0.input_layernorm",
        "rank divergence: rank 1 (rel-L2",
    );
    let fd = &r["first_divergence"];
    let note = fd["note"].as_str().unwrap();
    assert!(note.contains("from rank 0"), "{note}");
    assert!(r["diagnosis_note"].as_str().unwrap().contains("ranks that disagree"));
    // Judged on rank 0's tensor, not an average: its metrics pass the tolerance.
    assert!(fd["metrics"]["rel_l2"].as_f64().unwrap() < 1e-5, "{}", fd["metrics"]);
    // An all-reduced o_proj output that drifted a little on rank 0: a divergence too,
    // not partial sums.
    let dump = tmp.path().join("o_proj");
    let e = "Module.model.layers.1.self_attn.o_proj.Linear.forward.0";
    change_rank(&src, &dump, 0, e, "output.0", |v| v.iter_mut().for_each(|x| *x *= 1.001));
    let o_proj = "model.layers.1.self_attn.o_proj";
    let r =
        assert_rank_divergence(&dump, &tmp.path().join("r2"), o_proj, "rank divergence: rank 1");
    assert_eq!(kind(&r, "prefill", o_proj), "replicated");
}

#[test]
fn partial_sums_over_ranks_are_added_without_a_map() {
    // Labelled synthetic: the real single-rank dump split over two ranks, o_proj, the
    // MLP and the embedding as exact partial sums (tests/msprobe_layouts.rs).
    let tmp = tempfile::tempdir().unwrap();
    let dump = tmp.path().join("split");
    split_over_two_ranks(&root().join("fixtures/msprobe/gqa_pad_f32"), &dump, None);
    let (code, r, err) = compare("golden/gqa_pad_f32", &dump, &tmp.path().join("r"));
    assert_eq!(code, Some(0), "{err}{:#?}", prefill_kinds(&r));
    assert_passes_with_kinds(&r, "split");
    for site in ["model.layers.0.self_attn.o_proj", "model.layers.1.mlp", "model.embed_tokens"] {
        assert_eq!(kind(&r, "prefill", site), "sum", "{site}");
    }
    assert_eq!(kind(&r, "prefill", "lm_head"), "concat(2)");
}

/// `t` with its last axis padded with zeros to `width`.
fn pad_last(t: &Tensor, width: usize) -> Tensor {
    let w = *t.shape().last().unwrap();
    let v = t.to_f64_vec();
    let mut out = Vec::new();
    for row in v.chunks(w) {
        out.extend_from_slice(row);
        out.extend(std::iter::repeat_n(0.0, width - w));
    }
    let mut s = t.shape().to_vec();
    *s.last_mut().unwrap() = width;
    Tensor::from_f64(&s, &out, t.dtype())
}

#[test]
fn megatron_style_layouts_beyond_hf_plan_are_reassembled() {
    // Labelled synthetic, from the real single-rank dump of golden/gqa_pad_f32 (8 query
    // heads, 2 key/value heads, head_dim 8, vocab 192) over 4 ranks as Megatron lays it
    // out: key/value heads replicated over pairs of ranks, query heads 2 a rank, lm_head
    // vocabulary-parallel over a vocabulary padded to 200, sequence-parallel
    // post-attention norms (prefill tokens 3, 2, 2, 2), the embedding's partial sums on
    // two ranks (zeros on the others), everything else whole.
    let tmp = tempfile::tempdir().unwrap();
    let dump = tmp.path().join("tp4");
    let module = |e: &str, m: &str| e.starts_with("Module.") && e.contains(&format!(".{m}."));
    make_ranks(
        &root().join("fixtures/msprobe/gqa_pad_f32"),
        &dump,
        4,
        Records::Tensors,
        |_, _, _| true,
        |r, e, take, t| {
            let last = t.shape().len() - 1;
            match take {
                "output.0" if module(e, "q_proj") => Some(slice(t, 2, r * 16, (r + 1) * 16)),
                "output.0" if module(e, "k_proj") || module(e, "v_proj") => {
                    Some(slice(t, 2, (r / 2) * 8, (r / 2 + 1) * 8))
                }
                "input.0" if module(e, "o_proj") => Some(slice(t, 2, r * 16, (r + 1) * 16)),
                "input.0" | "input.1" if e.starts_with("Torch.matmul.") => {
                    Some(slice(t, 1, r * 2, (r + 1) * 2))
                }
                "output.0" if e.starts_with("Functional.softmax.") => {
                    Some(slice(t, 1, r * 2, (r + 1) * 2))
                }
                "output.0" if e.starts_with("Module.lm_head.") => {
                    Some(slice(&pad_last(t, 200), last, r * 50, (r + 1) * 50))
                }
                "output.0" if module(e, "post_attention_layernorm") && t.shape()[1] == 9 => {
                    let (from, to) = [(0, 3), (3, 5), (5, 7), (7, 9)][r];
                    Some(slice(t, 1, from, to))
                }
                "output.0" if e.starts_with("Module.model.embed_tokens.") => {
                    let (hi, lo) = partial_sums(t);
                    let zero = Tensor::from_f64(t.shape(), &vec![0.0; t.numel()], DType::F32);
                    Some([hi, zero.clone(), lo, zero][r].clone())
                }
                _ => None,
            }
        },
    );
    let (code, r, err) = compare("golden/gqa_pad_f32", &dump, &tmp.path().join("r"));
    assert_eq!(code, Some(0), "{err}{:#?}", prefill_kinds(&r));
    assert_passes_with_kinds(&r, "tp4");
    for step in ["prefill", "decode.0"] {
        let kv = "concat(2), key/value heads replicated over 2 ranks";
        assert_eq!(kind(&r, step, "model.layers.0.self_attn.k_proj"), kv);
        assert_eq!(kind(&r, step, "model.layers.1.self_attn.v_proj"), kv);
        assert_eq!(kind(&r, step, "model.layers.0.self_attn.q_proj"), "concat(2)");
        assert_eq!(kind(&r, step, "model.layers.1.self_attn.k_cache"), "concat(1)");
        assert_eq!(kind(&r, step, "lm_head"), "concat(2), vocab padded from 200");
        assert_eq!(kind(&r, step, "model.embed_tokens"), "sum");
        assert_eq!(kind(&r, step, "model.layers.0.input_layernorm"), "replicated");
    }
    assert_eq!(kind(&r, "prefill", "model.layers.1.post_attention_layernorm"), "concat(1)");
    // A key/value replica that disagrees with its pair names its rank.
    let bad = tmp.path().join("bad");
    make_ranks(
        &root().join("fixtures/msprobe/gqa_pad_f32"),
        &bad,
        4,
        Records::Tensors,
        |_, _, _| true,
        |r, e, take, t| match take {
            "output.0" if module(e, "k_proj") && e.contains(".layers.0.") => {
                let mut p = slice(t, 2, (r / 2) * 8, (r / 2 + 1) * 8).to_f64_vec();
                if r == 3 {
                    p[0] += 0.5;
                }
                let mut s = t.shape().to_vec();
                s[2] = 8;
                Some(Tensor::from_f64(&s, &p, DType::F32))
            }
            "output.0" if module(e, "k_proj") => Some(slice(t, 2, (r / 2) * 8, (r / 2 + 1) * 8)),
            "output.0" if module(e, "q_proj") => Some(slice(t, 2, r * 16, (r + 1) * 16)),
            _ => None,
        },
    );
    assert_rank_divergence(
        &bad,
        &tmp.path().join("b"),
        "model.layers.0.self_attn.k_proj",
        "rank divergence: rank 3 (rel-L2",
    );
}

#[test]
fn pipeline_stages_holding_different_layers_are_read_from_their_stage() {
    // Labelled synthetic: the real single-rank dump as two pipeline stages, rank 0 with
    // everything but layer 1, rank 1 with layer 1 (and the model's own entry).
    let tmp = tempfile::tempdir().unwrap();
    let dump = tmp.path().join("pp");
    let in_layer1 =
        |e: &str, parent: &str| e.contains(".layers.1.") || parent.contains(".layers.1.");
    make_ranks(
        &root().join("fixtures/msprobe/gqa_pad_f32"),
        &dump,
        2,
        Records::Tensors,
        |r, e, parent| {
            let anchor = e.starts_with("Module.model.LlamaModel.");
            anchor || (r == 1) == in_layer1(e, parent)
        },
        |_, _, _, _| None,
    );
    let (code, r, err) = compare("golden/gqa_pad_f32", &dump, &tmp.path().join("r"));
    assert_eq!(code, Some(0), "{err}{:#?}", prefill_kinds(&r));
    assert_passes_with_kinds(&r, "pp");
    assert_eq!(kind(&r, "prefill", "model.layers.1.self_attn.q_proj"), "stage: rank 1");
    assert_eq!(kind(&r, "decode.0", "model.layers.1.self_attn.probs"), "stage: rank 1");
    assert_eq!(kind(&r, "prefill", "model.layers.0.mlp"), "stage: rank 0");
    assert_eq!(kind(&r, "prefill", "inputs.position_ids"), "replicated");
}

/// Writes the golden `golden/gqa_pad_f32` as a contract dump per rank into `dst`
/// (`rank0/`, `rank1/`, each with the golden's manifest): q/k/v projections split along
/// their last axis, o_proj's output as two exact partial sums, everything else whole;
/// `change(rank, step, site, values)` may alter a rank's tensor.
fn contract_per_rank(dst: &Path, change: impl Fn(usize, &str, &str, &mut Vec<f64>)) {
    use llama_parity::dump::Dump;
    let golden = Dump::open(&root().join("golden/gqa_pad_f32")).unwrap();
    for r in 0..2 {
        let mut tensors = std::collections::BTreeMap::new();
        for &step in &golden.manifest.steps {
            for site in golden.sites(step) {
                let t = golden.get(step, site).unwrap().unwrap();
                let name = site.to_string();
                let t = if name.ends_with("q_proj")
                    || name.ends_with("k_proj")
                    || name.ends_with("v_proj")
                {
                    let half = t.shape()[2] / 2;
                    slice(&t, 2, r * half, (r + 1) * half)
                } else if name.ends_with("o_proj") {
                    let (hi, lo) = partial_sums(&t);
                    [hi, lo][r].clone()
                } else {
                    t
                };
                let mut v = t.to_f64_vec();
                change(r, &step.to_string(), &name, &mut v);
                let t = Tensor::from_f64(t.shape(), &v, t.dtype());
                tensors.insert(format!("{step}/{name}"), t);
            }
        }
        let d = Dump::in_memory(golden.manifest.clone(), tensors).unwrap();
        d.write(&dst.join(format!("rank{r}"))).unwrap();
    }
}

#[test]
fn a_contract_dump_written_per_rank_is_put_back_together() {
    let tmp = tempfile::tempdir().unwrap();
    let dump = tmp.path().join("ranked");
    contract_per_rank(&dump, |_, _, _, _| {});
    let (code, r, err) = compare("golden/gqa_pad_f32", &dump, &tmp.path().join("r"));
    assert_eq!(code, Some(0), "{err}{}", r["first_divergence"]);
    assert_eq!(r["summary"]["fail"], 0);
    assert_eq!(r["summary"]["missing"], 0);
    for step in ["prefill", "decode.4"] {
        assert_eq!(kind(&r, step, "model.layers.1.self_attn.k_proj"), "concat(2)");
        assert_eq!(kind(&r, step, "model.layers.0.self_attn.o_proj"), "sum");
        assert_eq!(kind(&r, step, "model.layers.0.mlp"), "replicated");
    }
    assert_eq!(r["candidate_producer"]["ranks"], 2);
    // Rank 1's final norm off in one decode step: a rank divergence there.
    let bad = tmp.path().join("bad");
    contract_per_rank(&bad, |r, step, site, v| {
        if r == 1 && step == "decode.2" && site == "model.norm" {
            v[0] += 0.5;
        }
    });
    let r = assert_rank_divergence(
        &bad,
        &tmp.path().join("b"),
        "model.norm",
        "rank divergence: rank 1",
    );
    assert_eq!(r["first_divergence"]["step"], "decode.2");
    // A rank whose manifest differs exits 2 naming it.
    let m = bad.join("rank1/manifest.json");
    let text = std::fs::read_to_string(&m).unwrap().replace("\"decode.4\"", "\"decode.9\"");
    std::fs::write(&m, text).unwrap();
    let (code, _, err) = parity(&["compare", "golden/gqa_pad_f32", bad.to_str().unwrap()]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("rank1/manifest.json"), "{err}");
}

/// In every rank folder of the multi-rank msprobe dump `dir` (each holding the whole
/// tensors), replaces layer `i`'s modules `parts` (`model.layers.{i}.<part>`, their
/// `output.0`) by one module `model.layers.{i}.<fused>` whose output is `build(rank,
/// whole outputs)`, as a port with that projection fused would record it.
fn fuse_per_rank(
    dir: &Path,
    k: usize,
    parts: &[&str],
    fused: &str,
    build: impl Fn(usize, &[Tensor]) -> Tensor,
) {
    for step in std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().path()) {
        if !step.is_dir() {
            continue;
        }
        for r in 0..k {
            let rank = step.join(format!("rank{r}"));
            let data_dir = rank.join("dump_tensor_data");
            let mut djson = read_dump_json(&rank.join("dump.json"));
            let data = djson["data"].as_object_mut().unwrap();
            for i in 0..2 {
                let entry = |p: &str| format!("Module.model.layers.{i}.{p}.Linear.forward.0");
                let whole: Vec<Tensor> = parts
                    .iter()
                    .map(|p| {
                        let e = data.remove(&entry(p)).unwrap();
                        let f = data_dir.join(e["output"][0]["data_name"].as_str().unwrap());
                        pt::read(&f).unwrap()
                    })
                    .collect();
                let t = build(r, &whole);
                let file = format!("{}.output.0.npy", entry(fused));
                write_npy(&data_dir.join(&file), &t);
                let out = json!({"type": "torch.Tensor", "dtype": "torch.float32",
                                 "shape": t.shape(), "data_name": file});
                data.insert(
                    entry(fused),
                    json!({"input_args": [], "input_kwargs": {}, "output": [out]}),
                );
            }
            std::fs::write(rank.join("dump.json"), serde_json::to_string(&djson).unwrap()).unwrap();
        }
    }
}

/// `ts` interleaved column by column along the last axis: `[a0, b0, a1, b1, ...]`.
fn interleave_last(ts: &[Tensor]) -> Tensor {
    let w = *ts[0].shape().last().unwrap();
    let cols: Vec<Tensor> = (0..w)
        .flat_map(|j| ts.iter().map(move |t| slice(t, t.shape().len() - 1, j, j + 1)))
        .collect();
    crate::msprobe_layouts::concat_last(&cols)
}

#[test]
fn fused_gate_up_shards_are_split_per_rank_and_put_back_without_a_ranks_rule() {
    // Labelled synthetic, from the real single-rank dump `fixtures/msprobe/mlp/gqa_pad_f32`
    // (HF's run with the MLP's projections recorded; intermediate_size 128) over two
    // ranks: each rank's fused gate/up module holds its half of gate_proj's and of
    // up_proj's units, as Megatron lays `linear_fc1` out (`[gate_r | up_r]`, blocks) or
    // as MindFormers' `w_gate_hidden` does (pairs `[g, u, g, u, ..]`, groups). Judged
    // against the same run's contract dump, which holds the mlp.gate_proj, up_proj and
    // down_proj sites.
    let tmp = tempfile::tempdir().unwrap();
    let src = root().join("fixtures/msprobe/mlp/gqa_pad_f32");
    let golden = "fixtures/msprobe/mlp/gqa_pad_f32.contract";
    let fused = [
        ("mlp.gate_proj", ("mlp.gate_up_proj", "fused_gate_up", "gate")),
        ("mlp.up_proj", ("mlp.gate_up_proj", "fused_gate_up", "up")),
    ];
    // The single-rank dump read with the shipped map: the reference tensors.
    let hf = tmp.path().join("hf.json");
    std::fs::write(&hf, include_str!("../harness/dump/src/msprobe/maps/hf.json")).unwrap();
    let whole = import(&src, &hf, &tmp.path().join("whole"));
    for (layout, pairs) in [("blocks", false), ("groups", true)] {
        let dump = tmp.path().join(layout);
        make_ranks(&src, &dump, 2, Records::Tensors, |_, _, _| true, |_, _, _, _| None);
        fuse_per_rank(&dump, 2, &["mlp.gate_proj", "mlp.up_proj"], "mlp.gate_up_proj", |r, w| {
            let half = |t: &Tensor| slice(t, 2, r * 64, (r + 1) * 64);
            let (g, u) = (half(&w[0]), half(&w[1]));
            if pairs {
                interleave_last(&[g, u])
            } else {
                crate::msprobe_layouts::concat_last(&[g, u])
            }
        });
        let map = fused_hf_map(tmp.path(), &format!("{layout}.json"), &fused, layout);
        let (code, r, err) =
            compare_mapped(golden, &dump, &map, &tmp.path().join(format!("r_{layout}")));
        assert_eq!(code, Some(0), "{layout}: {err}{}", r["first_divergence"]);
        assert_eq!(r["summary"]["fail"], 0, "{layout}");
        let want = format!("fused gate/up ({layout}), concat(2)");
        for site in ["model.layers.0.mlp.gate_proj", "model.layers.1.mlp.up_proj"] {
            assert_eq!(entry(&r, "prefill", site)["status"], "pass", "{layout}: {site}");
            assert_eq!(kind(&r, "prefill", site), want, "{layout}: {site}");
        }
        assert_eq!(kind(&r, "prefill", "model.layers.1.mlp.down_proj"), "replicated");
        // Put back, they are the single-rank dump's tensors byte for byte.
        let imported = import(&dump, &map, &tmp.path().join(format!("imp_{layout}")));
        let step = imported.manifest.steps[0];
        for i in 0..2 {
            for p in ["gate_proj", "up_proj"] {
                let site = Site::parse(&format!("model.layers.{i}.mlp.{p}"));
                let (a, b) = (
                    imported.get(step, &site).unwrap().unwrap(),
                    whole.get(step, &site).unwrap().unwrap(),
                );
                assert!(a.bytes() == b.bytes(), "{layout}: {site} differs");
            }
        }
        // Read with the other layout, gate and up are mixed: it fails at the first gate_proj.
        let other = if pairs { "blocks" } else { "groups" };
        let wrong = fused_hf_map(tmp.path(), &format!("wrong_{layout}.json"), &fused, other);
        let (code, r, err) =
            compare_mapped(golden, &dump, &wrong, &tmp.path().join(format!("w_{layout}")));
        assert_eq!(code, Some(1), "{layout}: {err}");
        assert_eq!(r["first_divergence"]["site"], "model.layers.0.mlp.gate_proj", "{layout}");
    }
}

#[test]
fn a_fused_qkv_projection_over_ranks_is_split_per_rank_without_a_ranks_rule() {
    // Labelled synthetic, from the real single-rank dump of golden/gqa_pad_f32 (8 query
    // heads, 2 key/value heads, head_dim 8) over two ranks, each holding one key/value
    // head's group: its 4 query heads, its k and v heads, fused into one `qkv_proj`
    // whose output is 48 = 96 / 2 wide. Megatron's per-rank `[q_r | k_r | v_r]` (blocks)
    // and MindFormers' `w_qkv` (one group per key/value head, groups) agree at one group
    // a rank; read as blocks of the whole tensor (the ranks concatenated first) they
    // would not.
    let tmp = tempfile::tempdir().unwrap();
    let src = root().join("fixtures/msprobe/gqa_pad_f32");
    let fused = FUSED_QKV;
    // The dump over two ranks, each rank's q/k/v fused, rank `r` holding `q(r)` of its 32
    // query columns.
    let fused_ranks = |dump: &Path, q: fn(usize) -> usize| {
        make_ranks(&src, dump, 2, Records::Tensors, |_, _, _| true, |_, _, _, _| None);
        let parts = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"];
        fuse_per_rank(dump, 2, &parts, "self_attn.qkv_proj", |r, w| {
            crate::msprobe_layouts::concat_last(&[
                slice(&w[0], 2, r * 32, r * 32 + q(r)),
                slice(&w[1], 2, r * 8, (r + 1) * 8),
                slice(&w[2], 2, r * 8, (r + 1) * 8),
            ])
        });
    };
    for layout in ["blocks", "groups"] {
        let dump = tmp.path().join(layout);
        fused_ranks(&dump, |_| 32);
        let map = fused_hf_map(tmp.path(), &format!("{layout}.json"), &fused, layout);
        let (code, r, err) = compare_mapped(
            "golden/gqa_pad_f32",
            &dump,
            &map,
            &tmp.path().join(format!("r_{layout}")),
        );
        assert_eq!(code, Some(0), "{layout}: {err}{}", r["first_divergence"]);
        assert_passes_with_kinds(&r, layout);
        let want = format!("fused q/k/v ({layout}), concat(2)");
        for step in ["prefill", "decode.0"] {
            for p in ["q_proj", "k_proj", "v_proj"] {
                let site = format!("model.layers.1.self_attn.{p}");
                assert_eq!(kind(&r, step, &site), want, "{layout}: {step} {site}");
            }
        }
    }
    // One rank's piece a query head short: exit 2 naming its file.
    let dump = tmp.path().join("short");
    fused_ranks(&dump, |r| if r == 1 { 24 } else { 32 });
    let map = fused_hf_map(tmp.path(), "short.json", &fused, "blocks");
    let err = refused_with_map(&dump, &map);
    assert!(
        err.contains("rank1") && err.contains("qkv_proj") && err.contains("fused q/k/v"),
        "{err}"
    );
}

#[test]
fn statistics_of_megatron_style_ranks_merge_and_a_padded_vocabulary_is_judged_as_known() {
    // Labelled synthetic, from the real single-rank dump of golden/gqa_pad_f32 over 4
    // ranks as statistics (each piece's Max/Min/Mean/Norm, whole records keeping
    // msprobe's own): query heads 2 a rank, key/value heads replicated over pairs of
    // ranks, both norms sequence-parallel (prefill tokens 3, 2, 2, 2), lm_head
    // vocabulary-parallel over a vocabulary of 192 padded to `padded` (padding values
    // `pad`), its logits scaled by `scale`.
    let tmp = tempfile::tempdir().unwrap();
    let src = root().join("fixtures/msprobe/gqa_pad_f32");
    let module = |e: &str, m: &str| e.starts_with("Module.") && e.contains(&format!(".{m}."));
    let make = |name: &str, padded: usize, pad: f64, scale: f64| {
        let dump = tmp.path().join(name);
        let per = padded / 4;
        make_ranks(
            &src,
            &dump,
            4,
            Records::Statistics,
            |_, _, _| true,
            |r, e, take, t| match take {
                "output.0" if module(e, "q_proj") => Some(slice(t, 2, r * 16, (r + 1) * 16)),
                "output.0" if module(e, "k_proj") || module(e, "v_proj") => {
                    Some(slice(t, 2, (r / 2) * 8, (r / 2 + 1) * 8))
                }
                "output.0"
                    if (module(e, "input_layernorm") || module(e, "post_attention_layernorm"))
                        && t.shape()[1] == 9 =>
                {
                    let (from, to) = [(0, 3), (3, 5), (5, 7), (7, 9)][r];
                    Some(slice(t, 1, from, to))
                }
                "output.0" if e.starts_with("Module.lm_head.") => {
                    let v: Vec<f64> = t.to_f64_vec().iter().map(|x| x * scale).collect();
                    let t = Tensor::from_f64(t.shape(), &v, t.dtype());
                    let mut p = pad_last(&t, padded).to_f64_vec();
                    for (j, x) in p.iter_mut().enumerate() {
                        if j % padded >= 192 {
                            *x = pad;
                        }
                    }
                    let p = Tensor::from_f64(&[t.shape()[0], t.shape()[1], padded], &p, t.dtype());
                    Some(slice(&p, 2, r * per, (r + 1) * per))
                }
                _ => None,
            },
        );
        dump
    };
    let run = |dump: &Path| compare("golden/gqa_pad_f32", dump, &dump.with_extension("report"));
    // Padded to 200: rank 3 holds 42 real columns and 8 of padding (here 50.0, far above
    // any logit): one-sided, and it passes.
    let (code, r, err) = run(&make("p200", 200, 50.0, 1.0));
    assert_eq!(code, Some(0), "{err}{}", r["first_divergence"]);
    assert_passes_with_kinds(&r, "p200");
    for step in ["prefill", "decode.0"] {
        assert_eq!(kind(&r, step, "lm_head"), "concat(2), vocab padded from 200");
        let note = entry(&r, step, "lm_head")["note"].as_str().unwrap();
        assert!(note.contains("statistics only"), "{note}");
        assert!(note.contains("rank 3's statistics count its 8 padding columns"), "{note}");
        assert!(note.contains("judged one-sided"), "{note}");
        assert_eq!(kind(&r, step, "model.layers.0.self_attn.q_proj"), "concat(2)");
        let kv = "concat(2), key/value heads replicated over 2 ranks";
        assert_eq!(kind(&r, step, "model.layers.1.self_attn.v_proj"), kv);
    }
    for norm in ["input_layernorm", "post_attention_layernorm"] {
        assert_eq!(kind(&r, "prefill", &format!("model.layers.1.{norm}")), "concat(1)", "{norm}");
    }
    // Logits halved, padding zero: the merged Norm, an upper bound, falls below the
    // golden's. (Under padding of 50.0 it would not: one-sided statistics prove nothing
    // there.)
    let (code, r, err) = run(&make("p200_half", 200, 0.0, 0.5));
    assert_eq!(code, Some(1), "{err}");
    assert_eq!(r["first_divergence"]["site"], "lm_head", "{}", r["first_divergence"]);
    assert_eq!(r["first_divergence"]["step"], "prefill");
    // Padded to 256: rank 3 holds padding alone (zeros), cut; the merge is exact.
    let (code, r, err) = run(&make("p256", 256, 0.0, 1.0));
    assert_eq!(code, Some(0), "{err}{}", r["first_divergence"]);
    let lm = entry(&r, "prefill", "lm_head");
    assert_eq!(
        lm["reassembly"],
        "concat(2), vocab padded from 256 (rank 3 holding only padding cut)"
    );
    assert!(!lm["note"].as_str().unwrap().contains("padding"), "{}", lm["note"]);
    // Padded to 196 with zeros, and a 4-rank split of 49: rank 3 straddles; no rank holds
    // padding alone, so its zeros are not known to be zeros: one-sided still.
    let (code, r, err) = run(&make("p196", 196, 0.0, 1.0));
    assert_eq!(code, Some(0), "{err}{}", r["first_divergence"]);
    assert!(entry(&r, "prefill", "lm_head")["note"].as_str().unwrap().contains("judged one-sided"));
}

#[test]
fn real_mindspore_tensor_parallel_runs_per_rank_are_put_back_together() {
    // Real: the repository's MindSpore port run over 2 ranks on the CPU under msrun
    // (MindSpore 2.10's collectives), Megatron's split of its weights, one contract dump
    // per rank, prefill and decode.0 of golden/gqa_pad_f32
    // (fixtures/tp/make_mindspore_tp_dumps.py).
    let tmp = tempfile::tempdir().unwrap();
    let ms = root().join("fixtures/tp/mindspore");
    let (code, r, err) =
        compare("golden/gqa_pad_f32", &ms.join("gqa_pad_f32"), &tmp.path().join("c"));
    assert_eq!(code, Some(0), "{err}{}", r["first_divergence"]);
    assert_eq!(r["summary"]["fail"], 0);
    assert_eq!(r["candidate_producer"]["ranks"], 2);
    for step in ["prefill", "decode.0"] {
        for (site, want) in [
            ("model.layers.0.self_attn.q_proj", "concat(2)"),
            ("model.layers.1.self_attn.v_proj", "concat(2)"),
            ("model.layers.0.self_attn.q_rope", "concat(1)"),
            ("model.layers.1.self_attn.k_cache", "concat(1)"),
            ("model.layers.0.self_attn.probs", "concat(1)"),
            ("model.layers.1.self_attn.context", "concat(2)"),
            ("model.layers.0.self_attn.o_proj", "replicated"),
            ("model.layers.1.mlp", "replicated"),
            ("model.embed_tokens", "replicated"),
            ("model.norm", "replicated"),
            ("lm_head", "concat(2)"),
        ] {
            assert_eq!(kind(&r, step, site), want, "{step} {site}");
            assert_eq!(entry(&r, step, site)["status"], "pass", "{step} {site}");
        }
    }
    // The same run recorded before the row-parallel AllReduce: partial sums, added.
    let dump = ms.join("gqa_pad_f32__partial_sums");
    let (code, r, err) = compare("golden/gqa_pad_f32", &dump, &tmp.path().join("p"));
    assert_eq!(code, Some(0), "{err}{}", r["first_divergence"]);
    for step in ["prefill", "decode.0"] {
        assert_eq!(kind(&r, step, "model.layers.0.self_attn.o_proj"), "sum", "{step}");
        assert_eq!(kind(&r, step, "model.layers.1.mlp"), "sum", "{step}");
        assert_eq!(kind(&r, step, "model.layers.1"), "replicated", "{step}");
    }
    // rope.pos_reset planted on both ranks: found where it first shows, and named.
    let dump = ms.join("gqa_pad_f32__rope_pos_reset");
    let r = assert_pos_reset_found(&dump, &tmp.path().join("f"));
    assert_eq!(r["diagnosis"][0]["fault"], "rope.pos_reset", "{}", r["diagnosis"]);
}

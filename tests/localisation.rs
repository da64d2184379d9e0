//! When no known fault explains a divergence, the report says where it starts inside
//! the computation: which inputs of the first divergent site still match. Candidates
//! are copies of `gqa_pad_f32` with one site changed, so each input's status is known.

use std::collections::BTreeMap;

use llama_parity::compare::compare;
use llama_parity::compare::tolerance::Policy;
use llama_parity::contract::site::{self, Site, Step};
use llama_parity::diagnosis::localise;
use llama_parity::dump::{Dump, Tensor};

use crate::helpers::{parity, root};

/// `gqa_pad_f32` with `site` at `step` scaled by 1.5 (and `drop` left out).
fn candidate(step: Step, site: &str, drop: &[&str]) -> Dump {
    let g = Dump::open(&root().join("golden/gqa_pad_f32")).expect("open golden");
    let target = Site::parse(site);
    let mut tensors = BTreeMap::new();
    for &s in &g.manifest.steps {
        for st in g.sites(s) {
            if drop.contains(&st.to_string().as_str()) {
                continue;
            }
            let mut t = g.get(s, st).expect("read").expect("present");
            if s == step && *st == target {
                let v: Vec<f64> = t.to_f64_vec().iter().map(|x| x * 1.5).collect();
                t = Tensor::from_f64(t.shape(), &v, t.dtype());
            }
            tensors.insert(site::key(s, st), t);
        }
    }
    Dump::in_memory(g.manifest.clone(), tensors).expect("dump")
}

fn said(step: Step, site: &str, drop: &[&str]) -> String {
    let g = Dump::open(&root().join("golden/gqa_pad_f32")).expect("open golden");
    let cmp = compare(&g, &candidate(step, site, drop), &Policy::default()).expect("compare");
    localise(&cmp).expect("a divergence")
}

#[test]
fn the_statement_names_the_inputs_that_match_and_the_computation_between() {
    let cases = [
        (
            "model.layers.0.self_attn.q_rope",
            "prefill model.layers.0.self_attn.q_rope differs while its inputs q_proj, rotary cos \
             and rotary sin match: the rotation itself",
        ),
        (
            "model.layers.1.self_attn.probs",
            "prefill model.layers.1.self_attn.probs differs while its inputs q_rope, k_cache and \
             the mask match: the score scale or the softmax",
        ),
        (
            "model.layers.0",
            "prefill model.layers.0 differs while its inputs model.embed_tokens, o_proj and mlp \
             match: the residual adds",
        ),
        (
            "model.layers.1.mlp",
            "prefill model.layers.1.mlp differs while its inputs post_attention_layernorm match: \
             the MLP itself",
        ),
        (
            "model.norm",
            "prefill model.norm differs while its inputs model.layers.1 match: the final norm",
        ),
    ];
    for (site, starts) in cases {
        let got = said(Step::Prefill, site, &[]);
        println!("{got}");
        assert!(got.starts_with(starts), "{site}:\n  got      {got}\n  expected {starts}...");
    }
}

#[test]
fn an_input_that_was_not_dumped_is_said_not_compared() {
    let got = said(
        Step::Prefill,
        "model.layers.0.self_attn.q_rope",
        &["model.layers.0.self_attn.q_proj"],
    );
    assert!(
        got.contains("rotary cos and rotary sin match") && got.contains("q_proj not compared"),
        "{got}"
    );
}

#[test]
fn the_terminal_and_summary_give_it_when_no_fault_fits() {
    let tmp = tempfile::tempdir().expect("tmp");
    let cand = tmp.path().join("cand");
    candidate(Step::Decode(1), "model.layers.1", &[]).write(&cand).expect("write");
    let rep = tmp.path().join("rep");
    let (code, out, err) = parity(&[
        "compare",
        "golden/gqa_pad_f32",
        cand.to_str().unwrap(),
        "--report",
        rep.to_str().unwrap(),
    ]);
    assert_eq!(code, Some(1), "{out}{err}");
    let says = "decode.1 model.layers.1 differs while its inputs model.layers.0, o_proj and mlp match: the residual adds";
    assert!(out.contains(says), "{out}");
    let md = std::fs::read_to_string(rep.join("summary.md")).expect("summary.md");
    // Markdown escapes the underscores.
    assert!(md.contains(&says.replace('_', "\\_")), "{md}");
    let html = std::fs::read_to_string(rep.join("report.html")).expect("report.html");
    assert!(html.contains("the residual adds"), "the page says it too");
    let json = crate::helpers::report_json(&rep);
    assert!(json["localisation"].as_str().unwrap().starts_with("decode.1 model.layers.1 differs"));
    assert_eq!(json["diagnosis"].as_array().map(Vec::len), Some(0));
}

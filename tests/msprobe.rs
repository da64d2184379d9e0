//! msprobe dumps (`fixtures/msprobe/`, made by msprobe itself on the golden scenarios
//! and on HF-made faulty candidates: `fixtures/msprobe/make_dumps.py`) read as
//! candidates: `parity compare GOLDEN MSPROBE_DUMP` and `parity import msprobe`.

use std::path::{Path, PathBuf};

use crate::helpers::{copy_tree, parity, root};
use llama_parity::contract::site::{Site, Step};
use llama_parity::dump::Dump;
use serde_json::Value;

/// `parity compare GOLDEN CANDIDATE --report TMP`: (exit code, report.json).
fn compare(golden: &str, candidate: &str) -> (Option<i32>, Value) {
    let tmp = tempfile::tempdir().expect("tempdir");
    let rep = tmp.path().join("r");
    let (code, _, err) = parity(&["compare", golden, candidate, "--report", rep.to_str().unwrap()]);
    let text = std::fs::read_to_string(rep.join("report.json"))
        .unwrap_or_else(|e| panic!("{candidate}: no report ({e}); stderr: {err}"));
    (code, serde_json::from_str(&text).expect("report.json parses"))
}

fn first(report: &Value) -> (String, String) {
    let f = &report["first_divergence"];
    (f["step"].as_str().unwrap_or("").into(), f["site"].as_str().unwrap_or("").into())
}

fn top_fault(report: &Value) -> String {
    report["diagnosis"][0]["fault"].as_str().unwrap_or("").into()
}

/// The HF-made faulty runs dumped by msprobe in tensor mode (and in statistics mode).
const FAULTY: &[(&str, &str)] = &[
    ("gqa_pad_f32__rope_pos_reset", "rope.pos_reset"),
    ("gqa_pad_f32__rope_interleaved", "rope.interleaved"),
    ("gqa_pad_f32__kv_gqa_tiled", "kv.gqa_tiled"),
];

#[test]
fn correct_msprobe_dump_passes_against_its_golden() {
    let (code, rep) = compare("golden/gqa_pad_f32", "fixtures/msprobe/gqa_pad_f32");
    assert_eq!(code, Some(0), "{}", rep["summary"]);
    assert_eq!(rep["verdict"], "pass");
    // Every contract site of the recorded steps was found, including those found by
    // structure inside attention (matmul operands, softmax output, o_proj's input).
    let all = Site::all(2).len() as u64;
    for step in ["prefill", "decode.0"] {
        let passed = rep["sites"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|s| s["step"] == step && s["status"] == "pass")
            .count() as u64;
        assert_eq!(passed, all, "{step}: {passed} of {all} sites pass");
    }
}

/// The import holds exactly the run's tensors: `gqa_pad_f32.contract` is the contract
/// dump of the very run msprobe recorded (make_dumps.py), so every imported site,
/// layouts normalised and GQA repeats undone, equals it byte for byte.
#[test]
fn imported_msprobe_dump_equals_the_contract_dump_of_the_same_run_byte_for_byte() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("imported");
    let (code, stdout, err) = parity(&[
        "import",
        "msprobe",
        "fixtures/msprobe/gqa_pad_f32",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert_eq!(code, Some(0), "{err}");
    assert!(stdout.contains("imported"), "{stdout}");
    let imp = Dump::open(&out).unwrap();
    let golden = Dump::open(&root().join("fixtures/msprobe/gqa_pad_f32.contract")).unwrap();
    assert_eq!(imp.manifest.steps, vec![Step::Prefill, Step::Decode(0)]);
    let mut n = 0;
    for &step in &imp.manifest.steps {
        assert_eq!(imp.sites(step).len(), Site::all(2).len(), "{step}");
        for site in imp.sites(step) {
            let a = imp.get(step, site).unwrap().unwrap();
            let g = golden.get(step, site).unwrap().unwrap();
            assert_eq!(a.shape(), g.shape(), "{step}/{site}");
            assert_eq!(a.dtype(), g.dtype(), "{step}/{site}");
            assert!(a.bytes() == g.bytes(), "{step}/{site} differs from the run's contract dump");
            n += 1;
        }
    }
    assert_eq!(n, 2 * Site::all(2).len());
}

#[test]
fn each_faulty_msprobe_dump_fails_where_its_contract_dump_fails_and_is_diagnosed_the_same() {
    for (name, fault) in FAULTY {
        let (c_code, contract) =
            compare("golden/gqa_pad_f32", &format!("fixtures/candidates/{name}"));
        let (m_code, ms) = compare("golden/gqa_pad_f32", &format!("fixtures/msprobe/{name}"));
        assert_eq!((c_code, m_code), (Some(1), Some(1)), "{name}");
        assert_eq!(first(&ms), first(&contract), "{name}: first divergence");
        assert_eq!(top_fault(&contract), *fault, "{name}: contract dump's diagnosis");
        assert_eq!(top_fault(&ms), *fault, "{name}: msprobe dump's diagnosis");
    }
}

/// A copy of the committed correct tensor dump in a temp dir, to break.
fn copy_dump() -> (tempfile::TempDir, PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let dst = tmp.path().join("dump");
    copy_tree(&root().join("fixtures/msprobe/gqa_pad_f32"), &dst);
    (tmp, dst)
}

/// The data file of an entry's tensor in step0 of the copy.
fn data_file(dump: &Path, name: &str) -> PathBuf {
    let step0 = std::fs::read_dir(dump.join("step0")).unwrap().next().unwrap().unwrap().path();
    step0.join("dump_tensor_data").join(name)
}

const LN0: &str = "Module.model.layers.0.input_layernorm.LlamaRMSNorm.forward.0.output.0.pt";
const LOGITS: &str = "Module.lm_head.Linear.forward.0.output.0.pt";

/// Bad msprobe dumps: exit 2, one line, naming the file and what is wrong.
#[test]
fn bad_msprobe_dumps_exit_2_with_one_line_naming_the_file() {
    type Break = fn(&Path) -> PathBuf;
    let cases: &[(&str, Break, &str)] = &[
        (
            "missing data file",
            |d| {
                let f = data_file(d, LN0);
                std::fs::remove_file(&f).unwrap();
                f
            },
            "missing data file",
        ),
        (
            "shape disagreeing with dump.json",
            |d| {
                let f = data_file(d, LN0);
                std::fs::copy(data_file(d, LOGITS), &f).unwrap();
                f
            },
            "disagrees with dump.json",
        ),
        (
            ".pt not a zip",
            |d| {
                let f = data_file(d, LN0);
                std::fs::write(&f, b"this is not a zip archive").unwrap();
                f
            },
            "not a zip archive",
        ),
        (
            "unexpected pickle opcode",
            |d| {
                let f = data_file(d, LN0);
                let mut z = zip::ZipWriter::new(std::fs::File::create(&f).unwrap());
                let opts = zip::write::SimpleFileOptions::default()
                    .compression_method(zip::CompressionMethod::Stored);
                z.start_file("archive/data.pkl", opts).unwrap();
                // PROTO 2, then 0xff: no pickle opcode.
                std::io::Write::write_all(&mut z, b"\x80\x02\xff.").unwrap();
                z.finish().unwrap();
                f
            },
            "bad pickle",
        ),
    ];
    for (_what, breaker, says) in cases {
        let (tmp, dump) = copy_dump();
        let file = breaker(&dump);
        assert_refused(&dump, &[], &tmp.path().join("o"), &file, says);
    }
}

/// `parity compare golden/gqa_pad_f32 DUMP` and `parity import msprobe DUMP --out OUT`,
/// each with `extra` arguments: exit 2 with one line naming `file` and saying `says`.
pub fn assert_refused(dump: &Path, extra: &[&str], out: &Path, file: &Path, says: &str) {
    let d = dump.to_str().unwrap();
    for cmd in [
        vec!["compare", "golden/gqa_pad_f32", d],
        vec!["import", "msprobe", d, "--out", out.to_str().unwrap()],
    ] {
        let args: Vec<&str> = cmd.into_iter().chain(extra.iter().copied()).collect();
        let (code, _, err) = parity(&args);
        let lines: Vec<&str> = err.lines().collect();
        assert_eq!(code, Some(2), "{says}: {err}");
        assert_eq!(lines.len(), 1, "{says}: {err}");
        assert!(lines[0].contains(file.to_str().unwrap()), "{says}: {err}");
        assert!(lines[0].contains(says), "{says}: {err}");
    }
}

/// Statistics-mode dumps of the same runs: (dump, first divergence of the
/// statistics-only verdict). Statistics see every fault here where the contract dump
/// first shows it, but for the mask: HF's additive fill is float32's minimum, so
/// msprobe's Mean of the mask is -Infinity and its Norm Infinity, and the number of
/// hidden entries cannot be told; `mask.padding_ignored` is caught one site later, at
/// the softmax it feeds.
const STATS: &[(&str, &str, &str)] = &[
    ("gqa_pad_f32__rope_pos_reset", "decode.0", "inputs.position_ids"),
    ("gqa_pad_f32__rope_interleaved", "prefill", "model.layers.0.self_attn.q_rope"),
    ("gqa_pad_f32__norm_layernorm", "prefill", "model.layers.0.input_layernorm"),
    ("gqa_pad_f32__mask_padding_ignored", "prefill", "model.layers.0.self_attn.probs"),
    ("gqa_pad_f32__kv_gqa_tiled", "prefill", "model.layers.0.self_attn.probs"),
];

#[test]
fn statistics_mode_verdicts_are_marked_and_catch_what_statistics_can_show() {
    let (code, rep) = compare("golden/gqa_pad_f32", "fixtures/msprobe/stats/gqa_pad_f32");
    assert_eq!(code, Some(0), "{}", rep["summary"]);
    let sites = rep["sites"].as_array().unwrap();
    let checked: Vec<&Value> = sites.iter().filter(|s| s["status"] == "pass").collect();
    assert!(checked.len() >= 60, "{} sites checked", checked.len());
    for s in &checked {
        assert!(s["note"].as_str().unwrap_or("").starts_with("statistics only"), "{s}");
    }
    // The masks cannot be judged from msprobe's statistics (Mean overflows): skipped, said why.
    let masks: Vec<&Value> =
        sites.iter().filter(|s| s["site"] == "model.mask" && s["status"] != "missing").collect();
    assert_eq!(masks.len(), 2);
    for m in masks {
        assert_eq!(m["status"], "skipped");
        assert!(m["note"].as_str().unwrap().contains("cannot count hidden entries"), "{m}");
    }
    for (name, step, site) in STATS {
        let (code, rep) = compare("golden/gqa_pad_f32", &format!("fixtures/msprobe/stats/{name}"));
        assert_eq!(code, Some(1), "{name}");
        assert_eq!(first(&rep), (step.to_string(), site.to_string()), "{name}");
        assert!(
            rep["first_divergence"]["note"].as_str().unwrap_or("").starts_with("statistics only"),
            "{name}"
        );
        assert!(rep["diagnosis"].as_array().unwrap().is_empty(), "{name}");
    }
}

/// Real msprobe dumps of a MindSpore Llama (`fixtures/msprobe/mindspore/`, made by
/// `fixtures/msprobe/make_mindspore_dumps.py`: the repository's MindSpore port, which
/// names its Cells as MindFormers does, run in PYNATIVE mode under msprobe's MindSpore
/// debugger; `.npy` tensors), read with the shipped `mindformers` map.
#[test]
fn mindspore_npy_dumps_read_with_the_mindformers_map() {
    let ms = "fixtures/msprobe/mindspore";
    let tmp = tempfile::tempdir().unwrap();
    let rep = tmp.path().join("r");
    let map = ["--msprobe-map", "mindformers"];
    let run = |dump: &str| {
        let _ = std::fs::remove_dir_all(&rep);
        let args = ["compare", "golden/gqa_pad_f32", dump, "--report", rep.to_str().unwrap()];
        let (code, _, err) = parity(&[&args[..], &map[..]].concat());
        let text = std::fs::read_to_string(rep.join("report.json"))
            .unwrap_or_else(|e| panic!("{dump}: no report ({e}); {err}"));
        (code, serde_json::from_str::<Value>(&text).unwrap())
    };
    // The correct run passes, with every site the map names found at both steps:
    // embedding, 9 a layer, final norm and logits.
    let (code, rep_ok) = run(&format!("{ms}/gqa_pad_f32"));
    assert_eq!(code, Some(0), "{}", rep_ok["summary"]);
    assert_eq!(rep_ok["summary"]["pass"], 2 * (1 + 2 * 9 + 2), "{}", rep_ok["summary"]);
    // Its import equals the port's own contract dump of the same run, byte for byte.
    let out = tmp.path().join("imported");
    let (code, _, err) = parity(&[
        "import",
        "msprobe",
        &format!("{ms}/gqa_pad_f32"),
        "--out",
        out.to_str().unwrap(),
        "--msprobe-map",
        "mindformers",
    ]);
    assert_eq!(code, Some(0), "{err}");
    let imp = Dump::open(&out).unwrap();
    let port = Dump::open(&root().join(format!("{ms}/gqa_pad_f32.contract"))).unwrap();
    let mut n = 0;
    for &step in &imp.manifest.steps {
        for site in imp.sites(step) {
            let (a, b) =
                (imp.get(step, site).unwrap().unwrap(), port.get(step, site).unwrap().unwrap());
            assert_eq!((a.shape(), a.dtype()), (b.shape(), b.dtype()), "{step}/{site}");
            assert!(a.bytes() == b.bytes(), "{step}/{site} differs from the port's own dump");
            n += 1;
        }
    }
    assert_eq!(n, 42);
    // The port with LayerNorm planted fails at the first norm and is diagnosed.
    let (code, rep_bad) = run(&format!("{ms}/gqa_pad_f32__norm_layernorm"));
    assert_eq!(code, Some(1));
    assert_eq!(first(&rep_bad), ("prefill".into(), "model.layers.0.input_layernorm".into()));
    assert_eq!(top_fault(&rep_bad), "norm.layernorm");
}

/// A copy of the committed correct statistics dump with the recorded Norm of one
/// module's output in step0 (prefill) scaled by `factor`.
fn nudged_statistics(entry: &str, factor: f64) -> (tempfile::TempDir, PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let dst = tmp.path().join("stats");
    copy_tree(&root().join("fixtures/msprobe/stats/gqa_pad_f32"), &dst);
    let file = dst.join("step0/proc0/dump.json");
    let text = std::fs::read_to_string(&file).unwrap();
    let at = text.find(&format!("\"{entry}\"")).expect("entry");
    let out = at + text[at..].find("\"output\"").expect("output");
    let norm = out + text[out..].find("\"Norm\": ").expect("Norm") + "\"Norm\": ".len();
    let end = norm + text[norm..].find([',', '\n']).unwrap();
    let value: f64 = text[norm..end].trim().parse().unwrap();
    let nudged = format!("{}{:e}{}", &text[..norm], value * factor, &text[end..]);
    std::fs::write(&file, nudged).unwrap();
    (tmp, dst)
}

/// Regression: a statistics-mode msprobe candidate went around the pipeline, and
/// `--baseline` was silently ignored (`compare golden/gqa_pad_f32
/// fixtures/msprobe/stats/gqa_pad_f32 --baseline B --report R` exited 0 and R's
/// report.json had no `baseline`). The gate now holds each site's error bound against
/// the accepted report's: a Norm moved by 2e-5 (inside float32's rel-L2 tolerance of
/// 1e-4, 20 times its noise of 1e-6) passes alone and regresses against the baseline.
#[test]
fn statistics_candidates_are_held_against_a_baseline() {
    let stats = "fixtures/msprobe/stats/gqa_pad_f32";
    let tmp = tempfile::tempdir().unwrap();
    let dir = |n: &str| tmp.path().join(n).to_str().unwrap().to_string();
    let base = format!("{}/report.json", dir("accepted"));
    let (code, _, err) =
        parity(&["compare", "golden/gqa_pad_f32", stats, "--report", &dir("accepted")]);
    assert_eq!(code, Some(0), "{err}");

    let held = |cand: &str, report: &str| {
        let (code, out, err) = parity(&[
            "compare",
            "golden/gqa_pad_f32",
            cand,
            "--baseline",
            &base,
            "--report",
            &dir(report),
        ]);
        let rep: Value = serde_json::from_str(
            &std::fs::read_to_string(format!("{}/report.json", dir(report))).unwrap(),
        )
        .unwrap();
        (code, rep, format!("{out}{err}"))
    };
    let (code, rep, said) = held(stats, "same");
    assert_eq!(code, Some(0), "{said}");
    let b = &rep["baseline"];
    assert_eq!(b["report"], base.as_str(), "{said}");
    assert!(b["compared"].as_u64().unwrap() >= 64, "{b}");
    assert_eq!(b["regressions"], serde_json::json!([]), "{b}");

    let mlp = "Module.model.layers.0.mlp.LlamaMLP.forward.0";
    let (_keep, nudged) = nudged_statistics(mlp, 1.0 + 2e-5);
    let nudged = nudged.to_str().unwrap();
    let (code, rep) = compare("golden/gqa_pad_f32", nudged);
    assert_eq!(code, Some(0), "inside the tolerance alone: {}", rep["summary"]);
    let (code, rep, said) = held(nudged, "nudged");
    assert_eq!(code, Some(1), "{said}");
    assert_eq!(rep["verdict"], "fail");
    let regressed: Vec<(String, String)> = rep["baseline"]["regressions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| (r["step"].as_str().unwrap().into(), r["site"].as_str().unwrap().into()))
        .collect();
    assert_eq!(regressed, [("prefill".to_string(), "model.layers.0.mlp".to_string())]);
}

/// Each option a kind of candidate cannot take is refused, exit 2, in one line naming
/// the flag and why, never ignored.
#[test]
fn options_a_candidate_kind_cannot_take_exit_2_naming_the_flag() {
    let tmp = tempfile::tempdir().unwrap();
    let cache = tmp.path().join("cache");
    let keymap = tmp.path().join("keymap.json");
    std::fs::write(&keymap, r#"{"format": "llama-parity/keymap@1", "rules": []}"#).unwrap();
    let stats = "fixtures/msprobe/stats/gqa_pad_f32";
    let cases: &[(&str, Vec<&str>, &str, &str)] = &[
        (stats, vec!["--summary-only"], "--summary-only", "statistics alone already"),
        (stats, vec!["--floor-cache", cache.to_str().unwrap()], "--floor-cache", "noise floor"),
        (stats, vec!["--map", keymap.to_str().unwrap()], "--map", "not renamed by a key map"),
        (
            "fixtures/msprobe/gqa_pad_f32",
            vec!["--map", keymap.to_str().unwrap()],
            "--map",
            "not renamed by a key map",
        ),
        (
            "golden/gqa_pad_bf16",
            vec!["--msprobe-map", "hf"],
            "--msprobe-map",
            "not an msprobe dump",
        ),
    ];
    for (cand, extra, flag, says) in cases {
        let args: Vec<&str> = ["compare", "golden/gqa_pad_f32", cand]
            .into_iter()
            .chain(extra.iter().copied())
            .collect();
        let (code, _, err) = parity(&args);
        let lines: Vec<&str> = err.lines().filter(|l| l.starts_with("parity: error")).collect();
        assert_eq!(code, Some(2), "{args:?}: {err}");
        assert_eq!(lines.len(), 1, "{args:?}: {err}");
        assert!(lines[0].starts_with(&format!("parity: error: {flag}: ")), "{args:?}: {err}");
        assert!(lines[0].contains(says), "{args:?}: {err}");
    }
}

/// The summary's "x tolerance" of a statistics-mode site is its rel-L2 lower bound over
/// float32's threshold (1e-4; no max_abs rule), and the failing sites rank first.
/// Regression: the report judged the stored metrics again, their NaN cosine included,
/// so every site showed `inf` and the passing ones led the table in compute order.
#[test]
fn statistics_mode_sites_rank_by_the_bounds_they_were_judged_on() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let rep = tmp.path().join("r");
    let dump = "fixtures/msprobe/stats/gqa_pad_f32__norm_layernorm";
    let (code, _, err) =
        parity(&["compare", "golden/gqa_pad_f32", dump, "--report", rep.to_str().unwrap()]);
    assert_eq!(code, Some(1), "{err}");
    let md = std::fs::read_to_string(rep.join("summary.md")).expect("summary.md");
    // | status | step | site | rel_l2 | cosine | x tolerance | x floor |
    let rows: Vec<Vec<&str>> = md
        .lines()
        .filter(|l| l.starts_with("| pass |") || l.starts_with("| **fail** |"))
        .map(|l| l.split('|').map(str::trim).collect())
        .collect();
    assert_eq!(rows.len(), 10, "{md}");
    for r in &rows {
        let (rel, x): (f64, f64) = (r[4].parse().expect("rel_l2"), r[6].parse().expect("x tol"));
        assert!(x.is_finite() && (x - rel / 1e-4).abs() <= 0.01 + 1e-3 * x, "{r:?}");
        assert_eq!(r[1] == "**fail**", x > 1.0, "{r:?}");
    }
    assert!(rows.iter().all(|r| r[1] == "**fail**"), "28 sites fail, ranked first: {md}");
}

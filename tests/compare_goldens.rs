//! `parity compare` on the committed golden suite: each golden against itself passes;
//! a copy with one site scaled, or with one NaN planted, fails at exactly that site.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use llama_parity::contract::site::{self, Site, Step};
use llama_parity::dump::{DType, Dump, Precision, Tensor};
use serde_json::Value;

use crate::helpers::{parity, report_json};

fn goldens() -> Vec<PathBuf> {
    crate::helpers::dump_dirs("golden")
}

/// `parity compare GOLDEN CANDIDATE --report REPORT`: exit code, the output, and the
/// report's JSON (null when none was written).
fn compare(golden: &Path, candidate: &Path, report: &Path) -> (Option<i32>, String, Value) {
    let (code, out, err) = parity(&[
        "compare",
        golden.to_str().unwrap(),
        candidate.to_str().unwrap(),
        "--report",
        report.to_str().unwrap(),
    ]);
    let json = if report.join("report.json").is_file() { report_json(report) } else { Value::Null };
    (code, format!("{}: {out}{err}", golden.display()), json)
}

/// A copy of `golden` (activations and manifest) with `edit` applied to one tensor.
fn planted_copy(
    golden: &Path,
    dir: &Path,
    step: Step,
    site: &Site,
    edit: impl Fn(&mut Vec<f64>),
) -> PathBuf {
    let g = Dump::open(golden).expect("open golden");
    let mut tensors = BTreeMap::new();
    for &s in &g.manifest.steps {
        for st in g.sites(s) {
            let t = g.get(s, st).expect("read").expect("present");
            tensors.insert(site::key(s, st), t);
        }
    }
    let key = site::key(step, site);
    let t = tensors.get(&key).unwrap_or_else(|| panic!("{} lacks {key}", golden.display())).clone();
    let mut values = t.to_f64_vec();
    edit(&mut values);
    tensors.insert(key, Tensor::from_f64(t.shape(), &values, t.dtype()));
    let out = dir.join(golden.file_name().expect("name"));
    Dump::in_memory(g.manifest.clone(), tensors).expect("dump").write(&out).expect("write copy");
    out
}

#[test]
fn every_golden_passes_against_itself() {
    let tmp = tempfile::tempdir().expect("tmp");
    for g in goldens() {
        let rep = tmp.path().join(g.file_name().unwrap());
        let (code, out, r) = compare(&g, &g, &rep);
        assert_eq!(code, Some(0), "{out}");
        assert_eq!(r["verdict"], "pass");
        assert!(r["first_divergence"].is_null());
        assert_eq!(r["summary"]["fail"], 0);
        assert_eq!(r["summary"]["missing"], 0);
    }
}

#[test]
fn a_site_scaled_by_one_percent_is_the_first_divergence() {
    let tmp = tempfile::tempdir().expect("tmp");
    let site = Site::parse("model.layers.0.self_attn.v_proj");
    for g in goldens() {
        let m = Dump::open(&g).expect("open");
        // 1 % is the issue's planted error. bfloat16 stores ~2.4 significant digits
        // (eps 0.8 %), so a bf16 golden compared with itself at bf16 tolerance needs a
        // larger planted error to be a real divergence rather than rounding noise.
        let factor = match m.manifest.dtype {
            Precision::F32 => 1.01,
            Precision::F16 => 1.05,
            Precision::Bf16 => 1.10,
        };
        let step = Step::Decode(1);
        let copy =
            planted_copy(&g, tmp.path(), step, &site, |v| v.iter_mut().for_each(|x| *x *= factor));
        let rep = tmp.path().join(format!("{}-report", g.file_name().unwrap().to_string_lossy()));
        let (code, out, r) = compare(&g, &copy, &rep);
        assert_eq!(code, Some(1), "{out}");
        assert_eq!(r["first_divergence"]["step"], "decode.1", "{}", g.display());
        assert_eq!(r["first_divergence"]["site"], site.to_string(), "{}", g.display());
        assert_eq!(r["summary"]["fail"], 1, "{}: only the planted site differs", g.display());
    }
}

#[test]
fn a_single_nan_in_a_decode_site_is_the_first_divergence() {
    let tmp = tempfile::tempdir().expect("tmp");
    let site = Site::parse("model.layers.1.mlp");
    for g in goldens() {
        let step = Step::Decode(2);
        let copy = planted_copy(&g, tmp.path(), step, &site, |v| {
            let k = v.len() / 2;
            v[k] = f64::NAN;
        });
        let rep = tmp.path().join(format!("{}-report", g.file_name().unwrap().to_string_lossy()));
        let (code, out, r) = compare(&g, &copy, &rep);
        assert_eq!(code, Some(1), "{out}");
        assert_eq!(r["first_divergence"]["step"], "decode.2");
        assert_eq!(r["first_divergence"]["site"], "model.layers.1.mlp");
        assert_eq!(r["first_divergence"]["metrics"]["new_nonfinite"], 1);
        assert!(out.contains("NaN/Inf where the golden has none"), "{out}");
    }
}

#[test]
fn a_missing_site_is_reported_missing_never_pass() {
    let tmp = tempfile::tempdir().expect("tmp");
    let g = &goldens()[0];
    let d = Dump::open(g).expect("open");
    let mut tensors = BTreeMap::new();
    for &s in &d.manifest.steps {
        for st in d.sites(s) {
            if *st != Site::LmHead {
                tensors.insert(site::key(s, st), d.get(s, st).unwrap().unwrap());
            }
        }
    }
    let out = tmp.path().join("no-logits");
    Dump::in_memory(d.manifest.clone(), tensors).unwrap().write(&out).unwrap();
    let rep = tmp.path().join("rep");
    let (code, _, r) = compare(g, &out, &rep);
    assert_eq!(code, Some(0), "missing sites do not fail the gate by themselves");
    let lm: Vec<&serde_json::Value> =
        r["sites"].as_array().unwrap().iter().filter(|s| s["site"] == "lm_head").collect();
    assert!(!lm.is_empty());
    assert!(lm.iter().all(|s| s["status"] == "missing"));
    assert_eq!(r["summary"]["missing"], d.manifest.steps.len());
}

#[test]
fn the_npy_tree_form_reads_the_same_tensors_as_safetensors() {
    let tmp = tempfile::tempdir().expect("tmp");
    let g = &goldens()[0];
    let d = Dump::open(g).expect("open");
    let tree = tmp.path().join("tree");
    std::fs::create_dir_all(&tree).unwrap();
    std::fs::copy(g.join("manifest.json"), tree.join("manifest.json")).unwrap();
    for &s in &d.manifest.steps {
        let sd = tree.join("activations").join(s.to_string());
        std::fs::create_dir_all(&sd).unwrap();
        for st in d.sites(s) {
            let t = d.get(s, st).unwrap().unwrap();
            // .npy has no bfloat16: store such tensors widened to float32 (exact).
            let t = if t.dtype() == DType::BF16 {
                Tensor::from_f64(t.shape(), &t.to_f64_vec(), DType::F32)
            } else {
                t
            };
            let mut f = std::fs::File::create(sd.join(format!("{st}.npy"))).unwrap();
            write_npy(&mut f, &t);
        }
    }
    let (code, out, err) = parity(&["compare", g.to_str().unwrap(), tree.to_str().unwrap()]);
    assert_eq!(code, Some(0), "{out}{err}");
}

fn write_npy(f: &mut std::fs::File, t: &Tensor) {
    use std::io::Write;
    let descr = match t.dtype() {
        DType::F64 => "<f8",
        DType::F32 => "<f4",
        DType::F16 => "<f2",
        DType::I64 => "<i8",
        DType::I32 => "<i4",
        DType::U8 => "|u1",
        DType::Bool => "|b1",
        DType::BF16 => unreachable!("widened above"),
    };
    let shape = match t.shape() {
        [] => "()".to_string(),
        [d] => format!("({d},)"),
        s => format!("({})", s.iter().map(|d| d.to_string()).collect::<Vec<_>>().join(", ")),
    };
    let mut h = format!("{{'descr': '{descr}', 'fortran_order': False, 'shape': {shape}, }}");
    while (10 + h.len() + 1) % 64 != 0 {
        h.push(' ');
    }
    h.push('\n');
    f.write_all(b"\x93NUMPY\x01\x00").unwrap();
    f.write_all(&(h.len() as u16).to_le_bytes()).unwrap();
    f.write_all(h.as_bytes()).unwrap();
    f.write_all(t.bytes()).unwrap();
}

#[test]
fn a_site_map_lets_a_candidate_use_its_own_site_names() {
    let tmp = tempfile::tempdir().expect("tmp");
    let g = Path::new(env!("CARGO_MANIFEST_DIR")).join("golden/gqa_pad_f32");
    let d = Dump::open(&g).expect("open");
    // The candidate calls the q/k projections by MindFormers' names.
    let renamed = d
        .rename_sites(|s| {
            let s = s.strip_prefix("model.layers.")?;
            let (i, rest) = s.split_once('.')?;
            let port = match rest {
                "self_attn.q_proj" => "attention.wq",
                "self_attn.k_proj" => "attention.wk",
                _ => return None,
            };
            Some(format!("layers.{i}.{port}"))
        })
        .expect("rename");
    let cand = tmp.path().join("cand");
    renamed.write(&cand).expect("write");
    let map = tmp.path().join("sites.json");
    std::fs::write(
        &map,
        r#"{"format": "llama-parity/keymap@1", "rules": [
            {"hf": "model.layers.{i}.self_attn.q_proj", "port": "layers.{i}.attention.wq"},
            {"hf": "model.layers.{i}.self_attn.k_proj", "port": "layers.{i}.attention.wk"}]}"#,
    )
    .unwrap();
    let rep = tmp.path().join("rep");
    let (code, out, err) = parity(&[
        "compare",
        g.to_str().unwrap(),
        cand.to_str().unwrap(),
        "--map",
        map.to_str().unwrap(),
        "--report",
        rep.to_str().unwrap(),
    ]);
    assert_eq!(code, Some(0), "{out}{err}");
    assert_eq!(report_json(&rep)["summary"]["missing"], 0);
    let (code, _, r) = compare(&g, &cand, &rep);
    assert_eq!(code, Some(0));
    let layers = d.manifest.model.num_hidden_layers;
    assert_eq!(
        r["summary"]["missing"],
        2 * layers * d.manifest.steps.len(),
        "without the map the renamed sites are missing"
    );
}

#[test]
fn without_weights_beside_the_golden_the_report_says_why_there_is_no_diagnosis() {
    let tmp = tempfile::tempdir().expect("tmp");
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let g = tmp.path().join("golden");
    std::fs::create_dir_all(&g).unwrap();
    for f in ["manifest.json", "activations.safetensors"] {
        std::fs::copy(root.join("golden/gqa_pad_f32").join(f), g.join(f)).unwrap();
    }
    let cand = root.join("fixtures/candidates/gqa_pad_f32__rope_pos_reset");
    let rep = tmp.path().join("rep");
    let (code, out, r) = compare(&g, &cand, &rep);
    assert_eq!(code, Some(1));
    assert!(out.contains("diagnosis: not made: the golden has no weights"), "{out}");
    assert_eq!(r["diagnosis"].as_array().map(Vec::len), Some(0));
    assert!(r["diagnosis_note"].as_str().unwrap().contains("weights.safetensors"));
    let (_, out, _) = parity(&["compare", "golden/gqa_pad_f32", cand.to_str().unwrap()]);
    assert!(out.contains("rope.pos_reset"), "with weights the fault is named: {out}");
    // The evidence speaks of positions: gqa_pad_f32 has 6 and 9 real prefill tokens.
    assert!(out.contains("decode.0 was fed positions [0, 0] instead of [6, 9]"), "{out}");
}

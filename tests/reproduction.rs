//! A noise floor is believed only where the harness reproduces the golden
//! (`compare::reproduce`): goldens it cannot reproduce, manifest fields and config keys
//! it does not implement, and floor caches that hold wrong numbers never pass.

use std::path::Path;
use std::process::Command;

use safetensors::tensor::{Dtype, TensorView};

use crate::helpers::{copy_tree, root};

/// Runs `parity` from the repository root with its own floor cache `cache`.
fn parity_cached(cache: &Path, args: &[&str]) -> (Option<i32>, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_parity"))
        .current_dir(root())
        .env("PARITY_FLOOR_CACHE", cache)
        .args(args)
        .output()
        .expect("run parity");
    let text = |b: Vec<u8>| String::from_utf8_lossy(&b).into_owned();
    (out.status.code(), text(out.stdout), text(out.stderr))
}

/// A copy of the committed golden `name` in `dir`, its manifest edited by `edit`.
fn golden_copy(name: &str, dir: &Path, edit: impl FnOnce(&mut serde_json::Value)) -> String {
    copy_tree(&root().join("golden").join(name), dir);
    let path = dir.join("manifest.json");
    let mut m: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    edit(&mut m);
    std::fs::write(&path, serde_json::to_string_pretty(&m).unwrap()).unwrap();
    dir.to_str().unwrap().to_string()
}

/// Rewrites the float32 `weights.safetensors` in `dir`, every tensor passed through `f`
/// (name, values) → values.
fn rewrite_weights(dir: &Path, f: impl Fn(&str, &[f32]) -> Vec<f32>) {
    let path = dir.join("weights.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut out: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::new();
    for (name, view) in st.tensors() {
        assert_eq!(view.dtype(), Dtype::F32, "{name}");
        let vals: Vec<f32> = view
            .data()
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        let new = f(&name, &vals);
        out.push((
            name.clone(),
            view.shape().to_vec(),
            new.iter().flat_map(|v| v.to_le_bytes()).collect(),
        ));
    }
    let views: Vec<(String, TensorView)> = out
        .iter()
        .map(|(n, shape, data)| {
            (n.clone(), TensorView::new(Dtype::F32, shape.clone(), data).unwrap())
        })
        .collect();
    safetensors::serialize_to_file(views, &None, &path).unwrap();
}

#[test]
fn a_golden_with_a_missing_adapter_or_a_malformed_training_step_exits_2_naming_it() {
    let tmp = tempfile::tempdir().unwrap();
    let cache = tmp.path().join("cache");
    let adapter = golden_copy("gqa_pad_f32", &tmp.path().join("adapter"), |m| {
        m["adapter"] = serde_json::json!({"path": "adapter", "merged": false});
    });
    let train = golden_copy("gqa_pad_f32", &tmp.path().join("train"), |m| {
        m["train"] = serde_json::json!({"trainable": "all"});
    });
    // A golden whose manifest names an adapter that is not there exits 2 naming the
    // adapter's file; a `train` field without its labels, naming the missing key.
    for (g, names) in
        [(&adapter, "adapter/adapter_config.json"), (&train, "field `train.labels` is missing")]
    {
        let mut runs = vec![
            vec!["run", g.as_str(), "--impl", "reference"],
            vec!["compare", g.as_str(), "golden/gqa_pad_f32"],
            vec!["check-golden", g.as_str()],
        ];
        if g == &train {
            runs.push(vec!["compare", "golden/gqa_pad_f32", g.as_str()]);
        }
        for args in runs {
            let (code, _, err) = parity_cached(&cache, &args);
            assert_eq!(code, Some(2), "{args:?}: {err}");
            assert!(err.contains(names), "{args:?}: {err}");
            let errors = err.lines().filter(|l| l.starts_with("parity: error")).count();
            assert_eq!(errors, 1, "one error line: {err}");
        }
    }
}

#[test]
fn a_golden_whose_weights_do_not_belong_to_its_activations_is_never_passed() {
    let tmp = tempfile::tempdir().unwrap();
    let cache = tmp.path().join("cache");
    // Every weight scaled by 1.5: the embedding lookup is the first site off.
    let scaled = golden_copy("gqa_pad_f32", &tmp.path().join("scaled"), |_| {});
    rewrite_weights(Path::new(&scaled), |_, v| v.iter().map(|x| x * 1.5).collect());
    // The two layers' weights exchanged: each tensor alone is plausible, none belongs.
    let swapped = golden_copy("gqa_pad_f32", &tmp.path().join("swapped"), |_| {});
    let bytes = std::fs::read(Path::new(&swapped).join("weights.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let other = |name: &str| -> Option<Vec<f32>> {
        let n = if name.contains(".layers.0.") {
            name.replace(".layers.0.", ".layers.1.")
        } else if name.contains(".layers.1.") {
            name.replace(".layers.1.", ".layers.0.")
        } else {
            return None;
        };
        let v = st.tensor(&n).ok()?;
        Some(
            v.data()
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
        )
    };
    rewrite_weights(Path::new(&swapped), |name, v| other(name).unwrap_or_else(|| v.to_vec()));
    for (g, site) in
        [(&scaled, "prefill model.embed_tokens"), (&swapped, "prefill model.layers.0.")]
    {
        // The reference run and a faulty candidate: never a pass, exit 2 naming the site.
        for args in [
            vec!["run", g.as_str(), "--impl", "reference", "-q"],
            vec![
                "run",
                g.as_str(),
                "--impl",
                "ascend",
                "--dtype",
                "bfloat16",
                "--fault",
                "rope.interleaved",
                "-q",
            ],
            vec!["compare", g.as_str(), "golden/gqa_pad_f32", "-q"],
        ] {
            let (code, _, err) = parity_cached(&cache, &args);
            assert_eq!(code, Some(2), "{args:?}: {err}");
            assert!(err.contains("not reproduced") && err.contains(site), "{args:?}: {err}");
        }
        let (code, out, _) = parity_cached(&cache, &["check-golden", g]);
        assert_eq!(code, Some(1), "{out}");
        assert!(out.contains(&format!("NOT REPRODUCED at {site}")), "{out}");
        // --no-floor still compares, against the fixed defaults, and says so.
        let (code, out, _) = parity_cached(
            &cache,
            &["run", g.as_str(), "--impl", "reference", "--no-floor", "-q", "--no-diagnosis"],
        );
        assert_eq!(code, Some(1), "{out}");
        assert!(out.contains("no noise floor (--no-floor"), "{out}");
    }
    assert!(
        !cache.exists() || std::fs::read_dir(&cache).unwrap().next().is_none(),
        "no floor cached for a golden that is not reproduced"
    );
}

#[test]
fn every_committed_golden_is_reproduced() {
    let mut goldens: Vec<_> = std::fs::read_dir(root().join("golden"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.join("manifest.json").is_file())
        .collect();
    goldens.extend(
        std::fs::read_dir(root().join("fixtures/variants/golden"))
            .unwrap()
            .map(|e| e.unwrap().path()),
    );
    goldens.push(root().join("fixtures/checkpoints/tiny_llama3_golden"));
    goldens.sort();
    assert!(goldens.len() >= 12, "{goldens:?}");
    for g in goldens {
        let (code, out, err) = crate::helpers::parity(&["check-golden", g.to_str().unwrap()]);
        assert_eq!(code, Some(0), "{}: {out}{err}", g.display());
        assert!(out.contains("REPRODUCED: "), "{out}");
    }
}

/// Config keys that change the model and are not built are refused by name.
#[test]
fn config_keys_that_change_the_model_exit_2_naming_them() {
    let tmp = tempfile::tempdir().unwrap();
    let cache = tmp.path().join("cache");
    for (key, value) in [
        ("hidden_act", serde_json::json!("gelu")),
        ("sliding_window", serde_json::json!(4096)),
        ("quantization_config", serde_json::json!({"quant_method": "awq"})),
        ("model_type", serde_json::json!("mistral")),
        ("pretraining_tp", serde_json::json!(2)),
    ] {
        let g = golden_copy("gqa_pad_f32", &tmp.path().join(key), |m| {
            m["model"][key] = value.clone();
        });
        let (code, _, err) = parity_cached(&cache, &["run", &g, "--impl", "reference", "-q"]);
        assert_eq!(code, Some(2), "{key}: {err}");
        assert!(err.contains(key), "{key}: {err}");
    }
}

/// A cached floor is validated when read: one with huge floors, garbage, or a FIFO in
/// its place is measured again, so a faulty candidate still fails and a correct one
/// still passes.
#[test]
fn a_poisoned_floor_cache_never_passes_a_faulty_candidate() {
    let tmp = tempfile::tempdir().unwrap();
    let cache = tmp.path().join("cache");
    let g = "golden/gqa_pad_f32";
    let correct = ["run", g, "--impl", "ascend", "--dtype", "bfloat16", "-q", "--no-diagnosis"];
    let faulty = [
        "run",
        g,
        "--impl",
        "ascend",
        "--dtype",
        "bfloat16",
        "--fault",
        "rope.interleaved",
        "-q",
        "--no-diagnosis",
    ];
    let (code, out, err) = parity_cached(&cache, &correct);
    assert_eq!(code, Some(0), "{out}{err}");
    let file = std::fs::read_dir(&cache)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| {
            let version = llama_parity::compare::floor::FORMAT.rsplit('@').next().unwrap();
            p.to_string_lossy().ends_with(&format!("-bfloat16-v{version}.json"))
        })
        .expect("the floor was cached");
    let text = std::fs::read_to_string(&file).unwrap();
    let mut floor: serde_json::Value = serde_json::from_str(&text).unwrap();
    let worst = floor["reproduction"]["worst_of_bound"].as_f64().expect("a reproduction record");
    assert!((0.0..=1.0).contains(&worst), "{worst}");
    for (_, s) in floor["sites"].as_object_mut().unwrap() {
        s["rel_l2"] = 1e3.into();
        s["cosine"] = (-0.5).into();
    }
    let huge = serde_json::to_string(&floor).unwrap();
    let mut lying = floor.clone();
    for (_, s) in lying["sites"].as_object_mut().unwrap() {
        s["rel_l2"] = 0.0.into();
        s["cosine"] = 1.0.into();
    }
    lying["reproduction"] = serde_json::Value::Null;
    let unrecorded = serde_json::to_string(&lying).unwrap();
    type Poison = Box<dyn Fn(&Path)>;
    let poisons: Vec<(&str, Poison)> = vec![
        ("huge floors", Box::new(move |p: &Path| std::fs::write(p, &huge).unwrap())),
        (
            "no reproduction record",
            Box::new(move |p: &Path| std::fs::write(p, &unrecorded).unwrap()),
        ),
        ("garbage", Box::new(|p: &Path| std::fs::write(p, "{\"format\": 1").unwrap())),
        (
            "a FIFO",
            Box::new(|p: &Path| {
                std::fs::remove_file(p).unwrap();
                assert!(Command::new("mkfifo").arg(p).status().unwrap().success());
            }),
        ),
    ];
    for (what, poison) in poisons {
        poison(&file);
        let (code, out, err) = parity_cached(&cache, &faulty);
        assert_eq!(code, Some(1), "{what}: the faulty candidate must fail: {out}{err}");
        poison(&file);
        let (code, out, err) = parity_cached(&cache, &correct);
        assert_eq!(code, Some(0), "{what}: the correct run still passes: {out}{err}");
    }
}

//! The committed golden suite is complete and intact: every contract site for every
//! step with the contract's shapes and dtypes, HF weights beside the activations, and
//! bytes that match golden/CHECKSUMS. No Python needed.

use std::path::{Path, PathBuf};

use llama_parity::contract::site::{Site, Step};
use llama_parity::dump::{DType, Dump};
use sha2::{Digest, Sha256};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).to_path_buf()
}

fn goldens() -> Vec<PathBuf> {
    crate::helpers::dump_dirs("golden")
}

/// The contract's shape of `site` at `step` (CONTRACT §1).
#[test]
fn the_suite_covers_the_required_scenarios() {
    let names: Vec<String> =
        goldens().iter().map(|p| p.file_name().unwrap().to_string_lossy().into_owned()).collect();
    for want in crate::helpers::GOLDENS {
        assert!(names.iter().any(|n| n == want), "golden/{want} is missing; have {names:?}");
    }
}

#[test]
fn every_golden_has_every_site_with_contract_shapes_and_dtypes() {
    let gs = goldens();
    assert!(!gs.is_empty());
    for g in gs {
        let d = Dump::open(&g).expect("open golden");
        let m = &d.manifest;
        assert!(m.scenario.prefill_len() >= 7, "{}: prefill shorter than 7", g.display());
        assert!(m.scenario.decode_steps() >= 4, "{}: fewer than 4 decode steps", g.display());
        let want_steps: Vec<Step> = std::iter::once(Step::Prefill)
            .chain((0..m.scenario.decode_steps()).map(Step::Decode))
            .collect();
        assert_eq!(m.steps, want_steps, "{}", g.display());
        for &step in &m.steps {
            for site in Site::all(m.model.num_hidden_layers) {
                let t = d
                    .get(step, &site)
                    .expect("read")
                    .unwrap_or_else(|| panic!("{}: {step}/{site} missing", g.display()));
                assert_eq!(
                    t.shape(),
                    site.shape(step, &m.shape_dims()).as_slice(),
                    "{}: {step}/{site}",
                    g.display()
                );
                let want = match site {
                    Site::PositionIds => DType::I64,
                    _ => m.dtype.dtype(),
                };
                assert_eq!(t.dtype(), want, "{}: {step}/{site} dtype", g.display());
            }
        }
    }
}

#[test]
fn every_golden_carries_hf_weights_of_the_configured_shapes() {
    for g in goldens() {
        let d = Dump::open(&g).expect("open golden");
        let w = d
            .weights()
            .expect("weights")
            .unwrap_or_else(|| panic!("{}: no weights.safetensors", g.display()));
        let m = &d.manifest.model;
        let hd = m.head_dim();
        let mut want =
            vec![("model.embed_tokens.weight".to_string(), vec![m.vocab_size, m.hidden_size])];
        want.push(("model.norm.weight".into(), vec![m.hidden_size]));
        if !m.tie_word_embeddings {
            want.push(("lm_head.weight".into(), vec![m.vocab_size, m.hidden_size]));
        }
        for i in 0..m.num_hidden_layers {
            let p = format!("model.layers.{i}.");
            want.push((
                format!("{p}self_attn.q_proj.weight"),
                vec![m.num_attention_heads * hd, m.hidden_size],
            ));
            want.push((
                format!("{p}self_attn.k_proj.weight"),
                vec![m.kv_heads() * hd, m.hidden_size],
            ));
            want.push((
                format!("{p}self_attn.v_proj.weight"),
                vec![m.kv_heads() * hd, m.hidden_size],
            ));
            want.push((
                format!("{p}self_attn.o_proj.weight"),
                vec![m.hidden_size, m.num_attention_heads * hd],
            ));
            want.push((
                format!("{p}mlp.gate_proj.weight"),
                vec![m.intermediate_size, m.hidden_size],
            ));
            want.push((format!("{p}mlp.up_proj.weight"), vec![m.intermediate_size, m.hidden_size]));
            want.push((
                format!("{p}mlp.down_proj.weight"),
                vec![m.hidden_size, m.intermediate_size],
            ));
            want.push((format!("{p}input_layernorm.weight"), vec![m.hidden_size]));
            want.push((format!("{p}post_attention_layernorm.weight"), vec![m.hidden_size]));
        }
        for (k, shape) in want {
            let t = w.require(&k).expect("weight present");
            assert_eq!(t.shape(), shape.as_slice(), "{}: {k}", g.display());
        }
    }
}

#[test]
fn committed_golden_files_match_their_checksums() {
    let text = std::fs::read_to_string(root().join("golden/CHECKSUMS")).expect("golden/CHECKSUMS");
    let mut n = 0;
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        let (sum, path) = line.split_once("  ").expect("`<sha256>  <path>` lines");
        let bytes = std::fs::read(root().join(path)).unwrap_or_else(|e| panic!("{path}: {e}"));
        let got = format!("{:x}", Sha256::digest(&bytes));
        assert_eq!(got, sum, "{path} changed since golden/CHECKSUMS was written");
        n += 1;
    }
    assert!(n >= goldens().len() * 3, "CHECKSUMS lists {n} files");
}

#[test]
fn the_committed_suite_stays_under_ten_megabytes() {
    fn size(p: &Path) -> u64 {
        if p.is_dir() {
            std::fs::read_dir(p).unwrap().filter_map(|e| e.ok()).map(|e| size(&e.path())).sum()
        } else {
            p.metadata().map(|m| m.len()).unwrap_or(0)
        }
    }
    let total = size(&root().join("golden")) + size(&root().join("fixtures/candidates"));
    assert!(total < 10 * 1024 * 1024, "golden suite is {total} bytes");
}

//! Small synthetic manifests, comparisons and fits for the unit tests.

use compare::metrics::Accumulator;
use compare::tolerance::Tolerance;
use compare::{SiteMetrics, SiteResult, Status};
use contract::site::{Site, Step};
use dump::{DType, Manifest, Precision, Tensor};
use serde_json::{json, Value};

use crate::fit::Fit;

/// A manifest of a tiny model (hidden 16, 4 heads of 4, 2 key/value heads, 2 layers,
/// pad id 0) and a scenario of one row with two padding slots, prefill `[0, 0, 7, 8]`
/// and two decode steps; `edit` changes the JSON before it is read.
pub fn manifest(edit: impl FnOnce(&mut Value)) -> Manifest {
    let mut v = json!({
        "model": {
            "vocab_size": 48,
            "hidden_size": 16,
            "intermediate_size": 32,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "head_dim": 4,
            "max_position_embeddings": 64,
            "rms_norm_eps": 1e-5,
            "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
            "pad_token_id": 0
        },
        "scenario": {
            "name": "tiny",
            "input_ids": [[0, 0, 7, 8]],
            "attention_mask": [[0, 0, 1, 1]],
            "decode_ids": [[5, 6]]
        },
        "steps": ["prefill", "decode.0", "decode.1"]
    });
    edit(&mut v);
    let steps = v["steps"]
        .as_array()
        .map(|a| a.iter().filter_map(|s| s.as_str().and_then(Step::parse)).collect())
        .unwrap_or_default();
    Manifest {
        producer: json!({"framework": "test"}),
        model: serde_json::from_value(v["model"].clone()).expect("model config"),
        dtype: Precision::F32,
        scenario: serde_json::from_value(v["scenario"].clone()).expect("scenario"),
        steps,
        adapter: None,
        train: None,
        raw: v,
    }
}

/// What a synthetic site measured.
#[derive(Clone, Copy)]
pub enum Measured {
    /// Float values, at this tolerance (or none recorded).
    Values(Option<f64>),
    /// A mask's visibility pattern.
    Pattern,
    /// Nothing (a missing or skipped site).
    Nothing,
}

/// A site result of `status` at `(step, site)` with metrics of the kind `measured` says.
pub fn site_result(step: Step, site: Site, status: Status, measured: Measured) -> SiteResult {
    let g = Tensor::from_array(&ndarray::arr1(&[1.0, 2.0]), DType::F32);
    let mut r = SiteResult::unmeasured(step, &site, &g, Some(vec![2]), Some(DType::F32));
    r.status = status;
    match measured {
        Measured::Values(tol) => {
            let mut acc = Accumulator::new(DType::F32);
            acc.push(0, 1.0, 1.0);
            acc.push(1, 2.0, 2.5);
            r.metrics = Some(SiteMetrics::Values(acc.finish(&[2])));
            r.tolerance = tol.map(|max_rel_l2| Tolerance {
                max_rel_l2,
                ..Tolerance::default_for(Precision::F32)
            });
        }
        Measured::Pattern => {
            r.metrics = Some(SiteMetrics::Visibility {
                count: 4,
                mismatches: 1,
                first_mismatch: Some(vec![0]),
                golden_visible: 2,
                candidate_visible: 3,
            });
        }
        Measured::Nothing => {}
    }
    r
}

/// A comparison of a float32 golden and candidate holding `sites`.
pub fn comparison(sites: Vec<SiteResult>) -> compare::Comparison {
    compare::Comparison {
        golden: "golden".into(),
        candidate: "candidate".into(),
        scenario: "tiny".into(),
        golden_precision: Precision::F32,
        candidate_precision: Precision::F32,
        candidate_producer: Value::Null,
        sites,
    }
}

/// A fit with these errors at the evidence sites, measured as rel-L2.
pub fn fit(errors: &[f64]) -> Fit {
    Fit { errors: errors.to_vec(), first_measure: "rel-L2" }
}

//! What a diagnosis hands on: the faults that explain a divergence, each with its scope,
//! parameters, score and evidence, and the hypotheses it could not try.

use contract::fault::ScopedFault;
use serde::{Deserialize, Serialize};

use crate::faults::{facts, Grid};

/// One hypothesis of the diagnosis: a known fault, where it acts and with which
/// parameters (CONTRACT §4), how well it explains the divergence (0..1), and the
/// evidence in numbers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Finding {
    pub fault: String,
    pub score: f64,
    /// CONTRACT §4: `{"layers": [2] | "all"}`, with `"steps": [..]` when narrowed to steps
    /// and `"component": name` when narrowed to one; absent in reports written before
    /// scopes were fitted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scope: Option<serde_json::Value>,
    /// The fitted parameters (`theta`, `scaling`, `table`, `offset`), empty for the
    /// family's default form.
    #[serde(default, skip_serializing_if = "serde_json::Map::is_empty")]
    pub params: serde_json::Map<String, serde_json::Value>,
    pub explains: String,
}

impl Finding {
    /// A finding for `planted`, with its scope and parameters in the contract's JSON.
    pub fn new(planted: &ScopedFault, score: f64, explains: String) -> Finding {
        use serde_json::{json, Value};
        let s = &planted.scope;
        let mut scope = serde_json::Map::new();
        scope.insert("layers".into(), s.layers.as_ref().map_or(json!("all"), |l| json!(l)));
        if let Some(steps) = &s.steps {
            scope.insert("steps".into(), json!(steps));
        }
        if let Some(c) = s.component {
            scope.insert("component".into(), json!(c.name()));
        }
        // A theta and scaling form other than the default says both its parameters.
        let mut p = planted.params;
        if facts(planted.fault).grid == Grid::ThetaAndScaling && !p.is_default() {
            p.theta = Some(p.theta_or_default());
            p.scaling = Some(p.scaling.unwrap_or(contract::fault::Scaling::Dropped));
        }
        let params = p.json().into_iter().map(|(k, v)| (k.to_string(), v)).collect();
        Finding {
            fault: planted.fault.id().to_string(),
            score,
            scope: Some(Value::Object(scope)),
            params,
            explains,
        }
    }

    /// The fault with its fitted scope and parameters, as a reader wants it:
    /// `weights.gate_up_swapped {layers: [2]}`, `rope.wrong_theta {theta: 500000,
    /// scaling: dropped}`; the bare ID when it acts everywhere in its default form.
    pub fn label(&self) -> String {
        use serde_json::Value;
        let mut parts = Vec::new();
        if let Some(Value::Object(scope)) = &self.scope {
            for key in ["layers", "steps", "component"] {
                match scope.get(key) {
                    None | Some(Value::Null) => {}
                    Some(Value::String(s)) if s == "all" => {}
                    Some(Value::String(s)) => parts.push(format!("{key}: {s}")),
                    Some(Value::Array(a)) => {
                        let items: Vec<String> = a
                            .iter()
                            .map(|v| v.as_str().map_or_else(|| v.to_string(), str::to_string))
                            .collect();
                        parts.push(format!("{key}: [{}]", items.join(", ")));
                    }
                    Some(v) => parts.push(format!("{key}: {v}")),
                }
            }
        }
        for (k, v) in &self.params {
            parts
                .push(format!("{k}: {}", v.as_str().map_or_else(|| v.to_string(), str::to_string)));
        }
        if parts.is_empty() {
            self.fault.clone()
        } else {
            format!("{} {{{}}}", self.fault, parts.join(", "))
        }
    }
}

/// What a diagnosis found, best first, and what it could not try.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Diagnosis {
    pub findings: Vec<Finding>,
    /// Hypotheses that could not be run on this golden, each with the reason.
    pub notes: Vec<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn label(spec: &str) -> String {
        let planted = ScopedFault::parse(spec).expect("a scoped fault");
        Finding::new(&planted, 1.0, String::new()).label()
    }

    #[test]
    fn a_default_form_acting_everywhere_is_labelled_by_its_bare_id() {
        assert_eq!(label("norm.layernorm"), "norm.layernorm");
        let f = Finding::new(&ScopedFault::parse("norm.layernorm").expect("id"), 0.5, "x".into());
        assert_eq!(f.scope, Some(serde_json::json!({"layers": "all"})));
        assert!(f.params.is_empty());
    }

    #[test]
    fn a_narrowed_form_is_labelled_with_its_scope() {
        assert_eq!(
            label("weights.gate_up_swapped@layers=2"),
            "weights.gate_up_swapped {layers: [2]}"
        );
        assert_eq!(
            label("attn.no_scale@layers=0-1@steps=decode.*"),
            "attn.no_scale {layers: [0, 1], steps: [decode.*]}"
        );
        assert_eq!(
            label("weights.transposed@component=o_proj"),
            "weights.transposed {component: o_proj}"
        );
    }

    #[test]
    fn a_theta_form_other_than_the_default_states_both_its_parameters() {
        assert_eq!(label("rope.wrong_theta"), "rope.wrong_theta");
        assert_eq!(
            label("rope.wrong_theta@theta=500000"),
            "rope.wrong_theta {scaling: dropped, theta: 500000.0}"
        );
        assert_eq!(
            label("rope.wrong_theta@scaling=kept"),
            "rope.wrong_theta {scaling: kept, theta: 10000.0}"
        );
        // Other families state only the parameters given.
        assert_eq!(label("kv.wrong_slot@offset=2"), "kv.wrong_slot {offset: 2}");
    }
}

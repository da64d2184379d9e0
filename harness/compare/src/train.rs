//! What comparing one training step (CONTRACT §6) adds to the comparison of a forward.
//!
//! - Two dumps are compared only when they are the same step: both training steps or
//!   neither, with the same `train` field (labels, trainable, optimizer, clipping, loss
//!   scale, micro-batches) and the same `adapter` ([`same_step`]). A compare of
//!   different steps is not a parity check: it is refused naming both.
//! - `update.<name>` is judged as its change `update − weight` from the golden's weight
//!   before the step ([`PreStep`]): AdamW's first step moves each element by about
//!   `lr` (`w − lr·sign(g)`), so the update itself is the weight to within `lr / |w|`
//!   and its error would be measured against the weight's size, not against what the
//!   optimizer did. A skipped step's change is zero on both sides.

use std::path::Path;

use contract::error::{Error, Result};
use contract::site::Site;
use dump::{DType, Dump, Manifest, SafetensorsFile, Tensor};

/// Refuses a comparison of two different steps, naming both dumps and the first field
/// that differs: a training golden against an inference candidate or the reverse, a
/// candidate whose `train` field differs from the golden's, or whose `adapter` differs
/// where both have one.
pub fn same_step(golden: &Manifest, candidate: &Manifest, g: &str, c: &Path) -> Result<()> {
    let refuse = |what: String| {
        Err(Error::Manifest {
            path: c.to_path_buf(),
            what: format!(
                "{what} (golden {g}): a compare of different steps is not a parity check"
            ),
        })
    };
    match (&golden.train, &candidate.train) {
        (None, None) => {}
        (Some(_), None) => {
            return refuse(
                "the golden is one training step (field `train`, CONTRACT §6) and the candidate \
                 is an inference run"
                    .into(),
            )
        }
        (None, Some(_)) => {
            return refuse(
                "the candidate is one training step (field `train`, CONTRACT §6) and the golden \
                 is an inference run"
                    .into(),
            )
        }
        (Some(a), Some(b)) => {
            let field = if a.labels != b.labels {
                Some("labels")
            } else if a.micro_batches != b.micro_batches {
                Some("micro_batches")
            } else if a.trainable != b.trainable {
                Some("trainable")
            } else if a.optimizer != b.optimizer {
                Some("optimizer")
            } else if a.max_grad_norm != b.max_grad_norm {
                Some("max_grad_norm")
            } else if a.loss_scale != b.loss_scale {
                Some("loss_scale")
            } else {
                None
            };
            if let Some(f) = field {
                return refuse(format!("field `train.{f}` differs from the golden's"));
            }
        }
    }
    if let (Some(a), Some(b)) = (&golden.adapter, &candidate.adapter) {
        if a != b {
            return refuse(format!(
                "field `adapter` ({{\"path\": {:?}, \"merged\": {}}}) differs from the golden's \
                 ({{\"path\": {:?}, \"merged\": {}}})",
                b.path, b.merged, a.path, a.merged
            ));
        }
    }
    Ok(())
}

/// The note of an `update.*` site judged as its change.
pub const CHANGE_NOTE: &str =
    "judged as the change update − weight, from the golden's weight before the step";

/// The golden's parameters before the step, where `update.<name>` finds its weight:
/// `weights.safetensors` (HF names) and, for an adapter, `adapter_model.safetensors`
/// (PEFT's names, as `param_grad` and `update` name them).
pub struct PreStep {
    files: Vec<SafetensorsFile>,
}

impl PreStep {
    /// The files of `golden` (none for an inference golden, or one whose weights are
    /// referenced: its updates are then compared as they are).
    pub fn open(golden: &Dump) -> Result<PreStep> {
        let mut files = Vec::new();
        if golden.manifest.train.is_none() {
            return Ok(PreStep { files });
        }
        if let Some(w) = golden.weights()? {
            files.push(w);
        }
        if let Some((dir, _)) = golden.adapter()? {
            let p = dir.join("adapter_model.safetensors");
            if p.is_file() {
                files.push(SafetensorsFile::open(&p)?);
            }
        }
        Ok(PreStep { files })
    }

    /// The weight `name` held before the step, if the golden has it.
    pub fn weight(&self, name: &str) -> Option<Tensor> {
        self.files.iter().find_map(|f| f.get(name))
    }

    /// `site`'s tensors as judged: for `update.<name>` with a known weight of the same
    /// shape, the changes `golden − weight` and `candidate − weight` (float64, exact for
    /// float32 and narrower values); else the tensors themselves. The flag says whether
    /// they are changes.
    pub fn judged(
        &self,
        site: &Site,
        g: Tensor,
        c: Option<Tensor>,
    ) -> (Tensor, Option<Tensor>, bool) {
        let Site::Update(name) = site else { return (g, c, false) };
        let Some(w) = self.weight(name) else { return (g, c, false) };
        if w.shape() != g.shape() || !w.dtype().is_float() {
            return (g, c, false);
        }
        let change = |t: &Tensor| {
            let v: Vec<f64> = t.iter_f64().zip(w.iter_f64()).map(|(a, b)| a - b).collect();
            Tensor::from_f64(t.shape(), &v, DType::F64)
        };
        let gc = change(&g);
        let cc =
            c.map(|c| if c.shape() == w.shape() && c.dtype().is_float() { change(&c) } else { c });
        (gc, cc, true)
    }
}

/// A scalar site's value (`loss`, `grad_norm`): its one element, `None` when the tensor
/// is not one element.
pub fn scalar(t: &Tensor) -> Option<f64> {
    (t.numel() == 1).then(|| t.get_f64(0))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn manifest(edit: impl Fn(&mut serde_json::Value)) -> Manifest {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/train/golden");
        let p = root.join("train_full_f32/manifest.json");
        let mut v: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&p).expect("manifest")).expect("json");
        edit(&mut v);
        Manifest::parse(&v.to_string(), &p).expect("a manifest")
    }

    #[test]
    fn only_the_same_step_is_compared_and_a_refusal_names_the_field_and_both_dumps() {
        let golden = manifest(|_| {});
        let c = Path::new("cand/manifest.json");
        assert!(same_step(&golden, &golden, "g", c).is_ok());
        let refused = |m: &Manifest| {
            let e = same_step(&golden, m, "golden-dir", c).expect_err("refused").to_string();
            assert!(e.contains("golden-dir") && e.contains("cand/manifest.json"), "{e}");
            e
        };
        let inference = manifest(|v| {
            v.as_object_mut().expect("object").remove("train");
            v["steps"] = serde_json::json!(["prefill"]);
        });
        assert!(refused(&inference).contains("inference run"));
        assert!(same_step(&inference, &golden, "g", c).is_err());
        assert!(same_step(&inference, &inference, "g", c).is_ok());
        for (key, value, field) in [
            ("lr", serde_json::json!(2e-3), "train.optimizer"),
            ("max_grad_norm", serde_json::json!(null), "train.max_grad_norm"),
            ("micro_batches", serde_json::json!(2), "train.micro_batches"),
        ] {
            let m = manifest(|v| {
                if key == "lr" {
                    v["train"]["optimizer"]["lr"] = value.clone();
                } else {
                    v["train"][key] = value.clone();
                }
            });
            assert!(refused(&m).contains(field), "{field}");
        }
        let scaled = manifest(|v| {
            v["train"]["loss_scale"] = serde_json::json!({"kind": "static", "value": 1024.0})
        });
        assert!(refused(&scaled).contains("train.loss_scale"));
    }
}

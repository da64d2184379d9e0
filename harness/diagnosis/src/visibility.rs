//! Where a fault can first change an activation, and whether a golden's model and
//! scenario give it anything to act on: the table's [`Needs`] read against a manifest.

use contract::fault::{Fault, Params};
use contract::site::{LayerPart, Site, Step};
use dump::{Manifest, Precision};

use crate::faults::{facts, Needs};

/// The earliest (step, site) at which a fault can change an activation.
pub fn earliest_effect(fault: Fault) -> (Step, Site) {
    facts(fault).acts_first.clone()
}

/// Whether a planted fault can show on a golden, and where it first does.
#[derive(Debug, Clone, PartialEq)]
pub enum Visibility {
    /// The first (step, site) in compute order whose comparison the fault changes.
    Shows(Step, Site),
    /// The golden's shape or scenario gives the fault nothing to act on.
    CannotShow(String),
}

/// Where `fault`, planted in a run at `precision` of the scenario in `m`, first shows
/// under the contract's comparison rules: [`earliest_effect`] refined by what the
/// model and scenario let the fault act on. Faults whose effect is below a dtype's
/// resolution are not decided here (that is a measurement, see `tests/fault_matrix.rs`).
pub fn first_site(fault: Fault, m: &Manifest, precision: Precision) -> Visibility {
    let c = &m.model;
    let sc = &m.scenario;
    let no = |why: &str| Visibility::CannotShow(why.to_string());
    let (step, site) = earliest_effect(fault);
    let shows = Visibility::Shows(step, site);
    match facts(fault).needs {
        Needs::Nothing => shows,
        Needs::DecodeStep if sc.decode_steps() == 0 => no("no decode step"),
        Needs::DecodeStep => shows,
        Needs::OtherRope => {
            let rope =
                model::rope::RopeConfig::from_model(c, std::path::Path::new("manifest.json"));
            match rope {
                Ok(r)
                    if r.theta == Params::default().theta_or_default()
                        && r.kind == model::rope::RopeType::Default =>
                {
                    no("the configured rope is already theta 10000 without scaling")
                }
                _ => shows,
            }
        }
        Needs::Padding if !sc.has_padding() => no("no padding"),
        Needs::Padding => shows,
        Needs::PadIdToken => {
            let pad = c.extra.get("pad_token_id").and_then(serde_json::Value::as_i64).unwrap_or(0);
            let in_prefill = sc
                .input_ids
                .iter()
                .zip(&sc.attention_mask)
                .any(|(ids, mask)| ids.iter().zip(mask).any(|(&i, &k)| k != 0 && i == pad));
            let in_decode = sc.decode_ids.iter().flatten().any(|&i| i == pad);
            if in_prefill {
                shows
            } else if in_decode {
                let j = (0..sc.decode_steps())
                    .find(|&j| sc.decode_ids.iter().any(|r| r.get(j) == Some(&pad)))
                    .unwrap_or(0);
                Visibility::Shows(Step::Decode(j), Site::Mask)
            } else {
                no("no real token has the pad id")
            }
        }
        // The -inf fill itself hides what it should (the mask is compared as a pattern);
        // the NaN of a fully hidden row is a padding query's, which comparisons leave
        // out, until layer 1 reads that row's keys and values at the padding slots.
        Needs::Float16PaddedLayers if precision != Precision::F16 => {
            no("the -1e9 fill is finite below float16")
        }
        Needs::Float16PaddedLayers if !sc.has_padding() => {
            no("no fully hidden row without padding")
        }
        Needs::Float16PaddedLayers if c.num_hidden_layers < 2 => {
            no("one layer: the NaN rows stay padding rows")
        }
        Needs::Float16PaddedLayers => {
            Visibility::Shows(Step::Prefill, Site::Layer(1, LayerPart::Probs))
        }
        // Each square projection is left untransposed, in the loader's order.
        Needs::SquareProjection => {
            let (nh, nkv, d, h) =
                (c.num_attention_heads, c.kv_heads(), c.head_dim(), c.hidden_size);
            let l0 = |p| Site::Layer(0, p);
            if nh * d == h {
                Visibility::Shows(step, l0(LayerPart::QProj))
            } else if nkv * d == h {
                Visibility::Shows(step, l0(LayerPart::KProj))
            } else if c.intermediate_size == h {
                Visibility::Shows(step, l0(LayerPart::Mlp))
            } else if c.vocab_size == h {
                Visibility::Shows(step, Site::LmHead)
            } else {
                no("no square projection")
            }
        }
        Needs::Adapter if m.adapter.is_none() => no("no LoRA adapter"),
        Needs::MergedAdapter if !m.adapter.as_ref().is_some_and(|a| a.merged) => {
            no("no merged LoRA adapter")
        }
        Needs::Adapter | Needs::MergedAdapter => shows,
        Needs::GroupedHeads => {
            let (nh, nkv) = (c.num_attention_heads, c.kv_heads());
            if nkv == 1 || nkv == nh {
                no("n_rep = 1 or nKV = 1: tiling and grouping agree")
            } else {
                shows
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::manifest;
    use serde_json::json;

    fn shows(v: Visibility) -> Option<(Step, Site)> {
        match v {
            Visibility::Shows(step, site) => Some((step, site)),
            Visibility::CannotShow(_) => None,
        }
    }

    #[test]
    fn a_fault_that_needs_nothing_shows_at_its_earliest_effect() {
        let m = manifest(|_| {});
        for fault in [Fault::NormLayernorm, Fault::AttnNoScale, Fault::MaskNone] {
            let v = first_site(fault, &m, Precision::F32);
            assert_eq!(shows(v), Some(earliest_effect(fault)), "{fault}");
        }
    }

    #[test]
    fn decode_faults_cannot_show_without_a_decode_step() {
        let m = manifest(|v| {
            v["scenario"]["decode_ids"] = json!([]);
            v["steps"] = json!(["prefill"]);
        });
        for fault in
            [Fault::RopePosReset, Fault::RopePosFixed, Fault::RopePosOffByOne, Fault::KvStale]
        {
            assert_eq!(
                first_site(fault, &m, Precision::F32),
                Visibility::CannotShow("no decode step".into()),
                "{fault}"
            );
        }
        let v = first_site(Fault::KvWrongSlot, &manifest(|_| {}), Precision::F32);
        assert_eq!(shows(v), Some((Step::Decode(0), Site::Layer(0, LayerPart::KCache))));
    }

    #[test]
    fn wrong_theta_cannot_show_on_a_rope_already_at_theta_10000_without_scaling() {
        let plain = manifest(|_| {});
        assert!(shows(first_site(Fault::RopeWrongTheta, &plain, Precision::F32)).is_none());
        let llama3 = manifest(|v| v["model"]["rope_parameters"]["rope_theta"] = json!(500000.0));
        let v = first_site(Fault::RopeWrongTheta, &llama3, Precision::F32);
        assert_eq!(shows(v), Some((Step::Prefill, Site::RotaryCos)));
    }

    #[test]
    fn padding_ignored_needs_padding() {
        let unpadded = manifest(|v| v["scenario"]["attention_mask"] = json!([[1, 1, 1, 1]]));
        assert!(shows(first_site(Fault::MaskPaddingIgnored, &unpadded, Precision::F32)).is_none());
        let padded = manifest(|_| {});
        let v = first_site(Fault::MaskPaddingIgnored, &padded, Precision::F32);
        assert_eq!(shows(v), Some((Step::Prefill, Site::Mask)));
    }

    #[test]
    fn pad_token_masked_shows_at_the_first_step_fed_a_real_pad_id() {
        // The base scenario's only pad ids are padding slots; decode.1 feeds one.
        let m = manifest(|v| v["scenario"]["decode_ids"] = json!([[5, 0]]));
        let v = first_site(Fault::MaskPadTokenMasked, &m, Precision::F32);
        assert_eq!(shows(v), Some((Step::Decode(1), Site::Mask)));
        let m = manifest(|v| v["scenario"]["input_ids"] = json!([[0, 0, 7, 8]]));
        let v = first_site(Fault::MaskPadTokenMasked, &m, Precision::F32);
        assert!(shows(v).is_none(), "pad ids at padding slots only");
        let m = manifest(|v| v["scenario"]["input_ids"] = json!([[0, 0, 0, 8]]));
        let v = first_site(Fault::MaskPadTokenMasked, &m, Precision::F32);
        assert_eq!(shows(v), Some((Step::Prefill, Site::Mask)));
    }

    #[test]
    fn fp16_overflow_shows_at_layer_1_probs_only_in_float16_padded_and_two_layers_deep() {
        let m = manifest(|_| {});
        let fault = Fault::MaskFp16Overflow;
        assert!(shows(first_site(fault, &m, Precision::Bf16)).is_none());
        let v = first_site(fault, &m, Precision::F16);
        assert_eq!(shows(v), Some((Step::Prefill, Site::Layer(1, LayerPart::Probs))));
        let one = manifest(|v| v["model"]["num_hidden_layers"] = json!(1));
        assert!(shows(first_site(fault, &one, Precision::F16)).is_none());
        let unpadded = manifest(|v| v["scenario"]["attention_mask"] = json!([[1, 1, 1, 1]]));
        assert!(shows(first_site(fault, &unpadded, Precision::F16)).is_none());
    }

    #[test]
    fn transposed_weights_show_at_the_first_square_projection_in_loader_order() {
        let at = |edit: fn(&mut serde_json::Value)| {
            shows(first_site(Fault::WeightsTransposed, &manifest(edit), Precision::F32))
        };
        let l0 = |p| Some((Step::Prefill, Site::Layer(0, p)));
        // Base: 4 heads of 4 = hidden 16.
        assert_eq!(at(|_| {}), l0(LayerPart::QProj));
        assert_eq!(
            at(|v| {
                v["model"]["num_attention_heads"] = json!(8);
                v["model"]["num_key_value_heads"] = json!(4);
            }),
            l0(LayerPart::KProj)
        );
        // Heads of 2: neither attention projection is square.
        assert_eq!(
            at(|v| {
                v["model"]["head_dim"] = json!(2);
                v["model"]["intermediate_size"] = json!(16);
            }),
            l0(LayerPart::Mlp)
        );
        assert_eq!(
            at(|v| {
                v["model"]["head_dim"] = json!(2);
                v["model"]["vocab_size"] = json!(16);
            }),
            Some((Step::Prefill, Site::LmHead))
        );
        assert_eq!(at(|v| v["model"]["head_dim"] = json!(2)), None);
    }

    #[test]
    fn gqa_tiling_shows_only_with_grouped_heads() {
        let grouped = manifest(|_| {});
        let v = first_site(Fault::KvGqaTiled, &grouped, Precision::F32);
        assert_eq!(shows(v), Some((Step::Prefill, Site::Layer(0, LayerPart::Probs))));
        for nkv in [1, 4] {
            let m = manifest(|v| v["model"]["num_key_value_heads"] = json!(nkv));
            assert!(shows(first_site(Fault::KvGqaTiled, &m, Precision::F32)).is_none(), "{nkv}");
        }
    }
}

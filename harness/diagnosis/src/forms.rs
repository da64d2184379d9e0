//! The forms of a fault family worth trying for a divergence (CONTRACT §4): its default
//! form, the scopes that begin where the divergence does, and the parameters its family
//! takes ([`crate::params`]); and where a form first acts, which is where its run departs
//! from the recorded correct run.

use contract::fault::{Component, Fault, Params, Scope, ScopedFault};
use contract::site::{LayerPart, Site, Step};
use dump::{Dump, Manifest};

use crate::visibility::earliest_effect;

/// The forms of `fault` worth trying for a divergence that starts at `first`, with the
/// parameter sets `params` (the default first): the contract's default form first, then
/// the scopes that begin where the divergence does (the first divergent layer alone,
/// widened later as the evidence asks; decode steps only when the divergence starts in
/// decode; the component whose site diverges first). No form is listed twice.
pub(crate) fn forms(fault: Fault, first: &(Step, Site), params: &[Params]) -> Vec<ScopedFault> {
    let (step, site) = first;
    let mut layer_scopes: Vec<Option<Vec<usize>>> = vec![None];
    if fault.takes_layers() {
        if let Site::Layer(l, _) = site {
            layer_scopes.push(Some(vec![*l]));
        }
    }
    let mut step_scopes: Vec<Option<Vec<String>>> = vec![None];
    let decode_only = matches!(earliest_effect(fault).0, Step::Decode(_));
    if fault.takes_steps() && !decode_only && matches!(step, Step::Decode(_)) {
        step_scopes.push(Some(vec!["decode.*".to_string()]));
    }
    let family = fault.components();
    let mut components: Vec<Option<Component>> =
        if crate::faults::facts(fault).component_required { vec![] } else { vec![None] };
    if !family.is_empty() {
        let at: Vec<Component> =
            components_at(site).into_iter().filter(|c| family.contains(c)).collect();
        components.extend(if at.is_empty() { family } else { at }.into_iter().map(Some));
    }
    let mut out = Vec::new();
    for layers in &layer_scopes {
        for component in &components {
            for steps in &step_scopes {
                for p in params {
                    let form = ScopedFault {
                        fault,
                        scope: Scope {
                            layers: layers.clone(),
                            steps: steps.clone(),
                            component: *component,
                        },
                        params: *p,
                    };
                    if !out.contains(&form) {
                        out.push(form);
                    }
                }
            }
        }
    }
    out
}

/// `form` with its layer scope grown by the next layer, when it is a run of layers that
/// stops before the last one.
pub(crate) fn widened(form: &ScopedFault, n_layers: usize) -> Option<ScopedFault> {
    let layers = form.scope.layers.as_ref()?;
    let (&lo, &hi) = (layers.first()?, layers.last()?);
    if hi + 1 >= n_layers || layers.len() != hi - lo + 1 {
        return None;
    }
    let mut wider = form.clone();
    wider.scope.layers = Some((lo..=hi + 1).collect());
    Some(wider)
}

/// Whether `form` is narrowed to one decoder layer.
pub(crate) fn is_single_layer(form: &ScopedFault) -> bool {
    form.scope.layers.as_ref().is_some_and(|l| l.len() == 1)
}

/// Where a run with `form` planted departs from the correct run of `golden`'s scenario
/// (nothing before it differs): the index of its step among the golden's steps, and its
/// decoder layer (all of them for the final norm and `lm_head`, none for the sites
/// before the layers). A hypothesis is replayed from there.
pub fn departure_of(golden: &Dump, form: &ScopedFault) -> Option<(usize, usize)> {
    departure(&golden.manifest, &form_effect(form))
}

/// Where a run whose first effect is `effect` departs from the correct run of the
/// scenario in `m`: see [`departure_of`].
pub(crate) fn departure(m: &Manifest, effect: &(Step, Site)) -> Option<(usize, usize)> {
    let step = m.steps.iter().position(|s| *s == effect.0)?;
    let layer = match effect.1 {
        Site::Layer(l, _) => l,
        Site::Norm | Site::LmHead => m.model.num_hidden_layers,
        _ => 0,
    };
    Some((step, layer))
}

/// The components whose own site is `site`.
fn components_at(site: &Site) -> Vec<Component> {
    use LayerPart::*;
    match site {
        Site::Norm => vec![Component::ModelNorm],
        Site::Layer(_, part) => match part {
            InputLayernorm => vec![Component::InputLayernorm],
            PostAttentionLayernorm => vec![Component::PostAttentionLayernorm],
            QProj | QProjLora => vec![Component::QProj],
            KProj | KProjLora => vec![Component::KProj],
            VProj | VProjLora => vec![Component::VProj],
            OProj | OProjLora => vec![Component::OProj],
            GateProj | GateProjLora => vec![Component::GateProj],
            UpProj | UpProjLora => vec![Component::UpProj],
            DownProj | DownProjLora => vec![Component::DownProj],
            Mlp => vec![Component::GateProj, Component::UpProj, Component::DownProj],
            _ => Vec::new(),
        },
        _ => Vec::new(),
    }
}

/// The site where `component` of layer `layer` is first seen.
fn component_site(component: Component, layer: usize) -> Site {
    use LayerPart::*;
    let part = match component {
        Component::ModelNorm => return Site::Norm,
        Component::InputLayernorm => InputLayernorm,
        Component::PostAttentionLayernorm => PostAttentionLayernorm,
        Component::QProj => QProj,
        Component::KProj => KProj,
        Component::VProj => VProj,
        Component::OProj => OProj,
        Component::GateProj | Component::UpProj | Component::DownProj => Mlp,
    };
    Site::Layer(layer, part)
}

/// The earliest (step, site) at which `form` can change an activation: the family's
/// [`earliest_effect`] moved to the first layer, step and component of its scope.
pub(crate) fn form_effect(form: &ScopedFault) -> (Step, Site) {
    use LayerPart::{DownProjLora, GateProjLora, UpProjLora};
    let (mut step, mut site) = earliest_effect(form.fault);
    let l0 = form.scope.layers.as_ref().and_then(|l| l.first().copied()).unwrap_or(0);
    if let Some(c) = form.scope.component {
        site = component_site(c, l0);
        // A LoRA fault acts on the projection's delta, before the projection itself.
        if form.fault.is_lora() {
            if let Site::Layer(l, part) = site {
                let part = match c {
                    Component::GateProj => GateProjLora,
                    Component::UpProj => UpProjLora,
                    Component::DownProj => DownProjLora,
                    _ => part.lora().unwrap_or(part),
                };
                site = Site::Layer(l, part);
            }
        }
    } else if let Site::Layer(_, part) = site {
        site = Site::Layer(l0, part);
    }
    if let Some(steps) = &form.scope.steps {
        if !steps.iter().any(|p| p == "prefill") {
            let first_decode = steps
                .iter()
                .filter_map(|p| match Step::parse(p) {
                    Some(Step::Decode(j)) => Some(j),
                    _ => (p == "decode.*").then_some(0),
                })
                .min()
                .unwrap_or(0);
            step = step.max(Step::Decode(first_decode));
        }
    }
    (step, site)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::manifest;

    fn scoped(spec: &str) -> ScopedFault {
        ScopedFault::parse(spec).expect("a scoped fault")
    }

    fn default_only() -> Vec<Params> {
        vec![Params::default()]
    }

    #[test]
    fn a_layer_family_is_tried_everywhere_then_at_the_first_divergent_layer() {
        let first = (Step::Prefill, Site::Layer(1, LayerPart::Mlp));
        let got = forms(Fault::WeightsGateUpSwapped, &first, &default_only());
        assert_eq!(
            got,
            [scoped("weights.gate_up_swapped"), scoped("weights.gate_up_swapped@layers=1")]
        );
    }

    #[test]
    fn a_whole_run_family_is_tried_in_its_default_form_only() {
        let first = (Step::Decode(1), Site::Layer(1, LayerPart::Probs));
        let got = forms(Fault::AttnSoftmaxLowPrecision, &first, &default_only());
        assert_eq!(got, [scoped("attn.softmax_low_precision")]);
    }

    #[test]
    fn decode_steps_are_tried_only_when_the_divergence_starts_in_decode() {
        let prefill = (Step::Prefill, Site::Layer(0, LayerPart::Probs));
        assert_eq!(forms(Fault::AttnNoScale, &prefill, &default_only()).len(), 2);
        let decode = (Step::Decode(2), Site::Layer(0, LayerPart::Probs));
        let got = forms(Fault::AttnNoScale, &decode, &default_only());
        assert!(got.contains(&scoped("attn.no_scale@steps=decode.*")), "{got:?}");
        assert!(got.contains(&scoped("attn.no_scale@layers=0@steps=decode.*")), "{got:?}");
        // A family that acts only in decode is never narrowed to decode steps.
        let got = forms(Fault::KvStale, &decode, &default_only());
        assert!(got.iter().all(|f| f.scope.steps.is_none()), "{got:?}");
    }

    #[test]
    fn a_component_family_is_narrowed_to_the_component_whose_site_diverges_first() {
        let first = (Step::Prefill, Site::Layer(0, LayerPart::PostAttentionLayernorm));
        let got = forms(Fault::NormLayernorm, &first, &default_only());
        assert!(got.contains(&scoped("norm.layernorm@component=post_attention_layernorm")));
        assert!(!got.iter().any(|f| f.scope.component == Some(Component::InputLayernorm)));
        // At a site of none of its components, every component of the family is tried.
        let first = (Step::Prefill, Site::Layer(0, LayerPart::Probs));
        let got = forms(Fault::NormLayernorm, &first, &default_only());
        let components: Vec<Component> = got.iter().filter_map(|f| f.scope.component).collect();
        assert_eq!(components.len(), 2 * Fault::NormLayernorm.components().len());
    }

    #[test]
    fn every_parameter_set_is_tried_for_every_scope_default_first() {
        let first = (Step::Prefill, Site::Layer(0, LayerPart::QRope));
        let sliced = scoped("rope.interleaved@table=sliced").params;
        let got = forms(Fault::RopeInterleaved, &first, &[Params::default(), sliced]);
        assert_eq!(
            got,
            [
                scoped("rope.interleaved"),
                scoped("rope.interleaved@table=sliced"),
                scoped("rope.interleaved@layers=0"),
                scoped("rope.interleaved@layers=0@table=sliced"),
            ]
        );
    }

    #[test]
    fn widening_grows_a_run_of_layers_by_one_until_the_last_layer() {
        let form = scoped("norm.bias@layers=1");
        assert_eq!(widened(&form, 4), Some(scoped("norm.bias@layers=1-2")));
        assert_eq!(
            widened(&scoped("norm.bias@layers=1-2"), 4),
            Some(scoped("norm.bias@layers=1-3"))
        );
        assert_eq!(widened(&scoped("norm.bias@layers=1-3"), 4), None);
        assert_eq!(widened(&scoped("norm.bias@layers=0,2"), 4), None, "not a run");
        assert_eq!(widened(&scoped("norm.bias"), 4), None, "everywhere already");
        assert!(is_single_layer(&form));
        assert!(!is_single_layer(&scoped("norm.bias@layers=1-2")));
    }

    #[test]
    fn a_form_first_acts_at_the_first_layer_step_and_component_of_its_scope() {
        use LayerPart::*;
        let effect = |spec: &str| form_effect(&scoped(spec));
        assert_eq!(effect("norm.bias"), (Step::Prefill, Site::Layer(0, InputLayernorm)));
        assert_eq!(effect("norm.bias@layers=2-3"), (Step::Prefill, Site::Layer(2, InputLayernorm)));
        assert_eq!(effect("norm.bias@component=model.norm"), (Step::Prefill, Site::Norm));
        assert_eq!(
            effect("weights.transposed@layers=1@component=o_proj"),
            (Step::Prefill, Site::Layer(1, OProj))
        );
        assert_eq!(
            effect("attn.no_scale@steps=decode.2,decode.1"),
            (Step::Decode(1), Site::Layer(0, Probs))
        );
        assert_eq!(
            effect("attn.no_scale@steps=decode.*"),
            (Step::Decode(0), Site::Layer(0, Probs))
        );
        assert_eq!(
            effect("attn.no_scale@steps=prefill,decode.1"),
            (Step::Prefill, Site::Layer(0, Probs))
        );
        // Never earlier than the family acts: kv.stale acts from decode.0 on.
        assert_eq!(effect("kv.stale@steps=decode.*").0, Step::Decode(0));
    }

    #[test]
    fn every_component_is_seen_first_at_a_site_that_names_it() {
        for c in Component::ALL {
            assert!(components_at(&component_site(c, 1)).contains(&c), "{}", c.name());
        }
    }

    #[test]
    fn a_run_departs_at_its_effects_step_and_layer() {
        let m = manifest(|_| {});
        let at = |step, site| departure(&m, &(step, site));
        assert_eq!(at(Step::Prefill, Site::Mask), Some((0, 0)));
        assert_eq!(at(Step::Decode(1), Site::Layer(1, LayerPart::KCache)), Some((2, 1)));
        assert_eq!(at(Step::Prefill, Site::LmHead), Some((0, 2)));
        assert_eq!(at(Step::Decode(0), Site::Norm), Some((1, 2)));
        assert_eq!(at(Step::Decode(5), Site::Mask), None, "a step the golden lacks");
    }
}

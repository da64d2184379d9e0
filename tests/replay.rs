//! Block replay: a hypothesis replayed from the correct run at the step and layer where
//! its fault first acts gives, bit for bit, the dump of a full run with that fault.

use llama_parity::contract::fault::{Fault, ScopedFault};
use llama_parity::contract::site::Step;
use llama_parity::diagnosis::departure_of;
use llama_parity::dump::{Dump, Precision};
use llama_parity::model::ascend::{self, AscendOptions, Hypothesis};
use llama_parity::model::plan::Plan;
use llama_parity::model::runner::Replay;
use llama_parity::model::RunContext;

use crate::helpers::root;

/// Every tensor of `a` equals `b`'s bit for bit; both hold the same sites.
fn assert_same(a: &Dump, b: &Dump, what: &str) {
    assert_eq!(a.manifest.steps, b.manifest.steps, "{what}: steps");
    let mut n = 0;
    for &step in &a.manifest.steps {
        assert_eq!(a.sites(step), b.sites(step), "{what}: {step} sites");
        for site in a.sites(step) {
            let (x, y) = (a.get(step, site).unwrap().unwrap(), b.get(step, site).unwrap().unwrap());
            let (x, y) = (x.to_f64_vec(), y.to_f64_vec());
            assert!(
                x.len() == y.len() && x.iter().zip(&y).all(|(p, q)| p.to_bits() == q.to_bits()),
                "{what}: {step} {site} differs"
            );
            n += 1;
        }
    }
    assert!(n > 0, "{what}: no sites");
}

#[test]
fn a_replayed_hypothesis_equals_its_full_run_bit_for_bit() {
    let mut replayed = 0;
    for (name, precision) in [
        ("golden/gqa_pad_f32", Precision::Bf16),
        ("golden/mqa_tied_f32", Precision::F32),
        ("fixtures/variants/golden/variants_f32", Precision::Bf16),
    ] {
        let golden = Dump::open(&root().join(name)).expect("golden");
        let opts = AscendOptions::mindformers(precision);
        let recorded =
            ascend::run_recorded(&golden, &opts, &RunContext::new()).expect("recorded run");
        let last = golden.manifest.model.num_hidden_layers - 1;
        let mut forms: Vec<ScopedFault> =
            Fault::ALL.iter().filter(|f| !f.is_lora()).map(|&f| ScopedFault::from(f)).collect();
        for spec in [
            format!("kv.stale@layers={last}"),
            format!("attn.no_scale@layers={last}@steps=decode.*"),
            "norm.layernorm@component=model.norm".to_string(),
            format!("weights.gate_up_swapped@layers={last}"),
            "rope.pos_off_by_one@offset=2".to_string(),
            "mask.padding_ignored@steps=decode.*".to_string(),
        ] {
            forms.push(ScopedFault::parse(&spec).unwrap_or_else(|e| panic!("{spec}: {e}")));
        }
        for form in forms {
            let plan = Plan::scoped(std::slice::from_ref(&form));
            let full = ascend::run(&golden, &opts, &plan, false, &RunContext::new())
                .expect("full run")
                .dump;
            let Some((step, layer)) = departure_of(&golden, &form) else { continue };
            if step > 0 || layer > 0 {
                replayed += 1;
            }
            let replay = Some(Replay { base: &recorded, step, layer });
            let h = Hypothesis { plan: &plan, replay, watch: None };
            let dump = ascend::run_hypothesis(&golden, &opts, h, &RunContext::new())
                .expect("replayed run");
            let at = golden.manifest.steps.get(step).copied().unwrap_or(Step::Prefill);
            assert_same(&dump, &full, &format!("{name} {form} from {at} layer {layer}"));
        }
    }
    // Decode faults, later layers and the final norm are replayed, not rerun.
    assert!(replayed >= 12, "only {replayed} forms departed after the start");
}

#[test]
fn a_replay_stopped_by_its_watch_ends_with_the_steps_it_ran() {
    use llama_parity::contract::site::Site;
    use llama_parity::model::llama::Watch;
    let golden = Dump::open(&root().join("golden/gqa_pad_f32")).expect("golden");
    let opts = AscendOptions::mindformers(Precision::Bf16);
    let recorded = ascend::run_recorded(&golden, &opts, &RunContext::new()).expect("recorded run");
    let form = ScopedFault::parse("kv.stale@layers=1").expect("form");
    let plan = Plan::scoped(std::slice::from_ref(&form));
    let (step, layer) = departure_of(&golden, &form).expect("departs");
    assert_eq!((step, layer), (1, 1));
    // Stop at layer 1's first site of decode.1.
    let watch = std::sync::Arc::new(Watch::new(|step, site, _| {
        !(step == Step::Decode(1) && matches!(site, Site::Layer(1, _)))
    }));
    let replay = Some(Replay { base: &recorded, step, layer });
    let h = Hypothesis { plan: &plan, replay, watch: Some(watch.clone()) };
    let dump = ascend::run_hypothesis(&golden, &opts, h, &RunContext::new())
        .expect("a stopped replay is a dump");
    assert!(watch.stopped());
    assert_eq!(dump.manifest.steps, vec![Step::Prefill, Step::Decode(0), Step::Decode(1)]);
    assert!(dump
        .sites(Step::Decode(1))
        .contains(&Site::Layer(0, llama_parity::contract::site::LayerPart::Output)));
}

/// A run decodes its steps together, a layer at a time for all of them, where nothing
/// watches it; a watched run decodes step by step. Both give the same bits, at every
/// numerics, with faults that act at some decode steps only, free and teacher-forced,
/// and where a product's rows cap how many steps go together (batch 3: two at a time).
#[test]
fn decoding_the_steps_together_equals_decoding_them_one_by_one_bit_for_bit() {
    use llama_parity::model::ascend::AscendNumerics;
    use llama_parity::model::llama::Watch;
    use llama_parity::model::numerics::{Exact, Numerics};
    use llama_parity::model::runner::{load_model, RopeTableSource, Runner};

    let ctx = RunContext::new();
    let mut compared = 0;
    for (name, decode_group) in
        [("golden/gqa_pad_f32", 4), ("golden/mqa_tied_f32", 2), ("golden/linear_f32", 8)]
    {
        let golden = Dump::open(&root().join(name)).expect("golden");
        for spec in
            ["", "kv.wrong_slot@steps=decode.1", "rope.pos_reset", "attn.no_scale@steps=decode.2"]
        {
            let forms: Vec<ScopedFault> = (!spec.is_empty())
                .then(|| ScopedFault::parse(spec).expect("form"))
                .into_iter()
                .collect();
            let plan = Plan::scoped(&forms);
            let model = load_model(&golden, &plan, &ctx, &mut Vec::new()).expect("model");
            let numerics: Vec<(Box<dyn Numerics>, RopeTableSource)> = vec![
                (Box::new(Exact::new(golden.manifest.dtype)), RopeTableSource::PerStep),
                (
                    Box::new(AscendNumerics::new(
                        AscendOptions::mindformers(Precision::Bf16),
                        &plan,
                    )),
                    RopeTableSource::Precomputed,
                ),
                (
                    Box::new(AscendNumerics::new(
                        AscendOptions::mindformers(Precision::F16),
                        &plan,
                    )),
                    RopeTableSource::Precomputed,
                ),
                (
                    Box::new(AscendNumerics::new(
                        AscendOptions::mindformers(Precision::F32),
                        &plan,
                    )),
                    RopeTableSource::Precomputed,
                ),
            ];
            for (n, rope_tables) in &numerics {
                let runner = |watch| Runner {
                    implementation: "test",
                    numerics: n.as_ref(),
                    plan: &plan,
                    declared: golden.manifest.dtype,
                    rope_tables: *rope_tables,
                    watch,
                    context: &ctx,
                };
                let together = runner(None);
                let one_by_one = runner(Some(std::sync::Arc::new(Watch::new(|_, _, _| true))));
                let what = format!("{name} [{spec}] {}", n.name());
                let a = together.run(&model, &golden, true).expect("run");
                let b = one_by_one.run(&model, &golden, true).expect("run");
                assert_same(&a.dump, &b.dump, &what);
                let (a, b) = (a.teacher_forced.expect("tf"), b.teacher_forced.expect("tf"));
                assert_same(&a, &b, &format!("{what}, teacher-forced"));
                compared += 1;
            }
        }
        // The group the session takes is the one the test means to cover.
        let plan = Plan::default();
        let model = load_model(&golden, &plan, &ctx, &mut Vec::new()).expect("model");
        let n = Exact::new(golden.manifest.dtype);
        let batch = golden.manifest.scenario.batch();
        let session = llama_parity::model::llama::Session::new(&model, batch, 32, &n, &plan);
        assert_eq!(session.decode_group(), decode_group, "{name}");
    }
    assert_eq!(compared, 3 * 4 * 4);
}

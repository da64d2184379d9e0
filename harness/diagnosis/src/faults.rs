//! What the diagnosis knows of each fault of CONTRACT §3, in one table ([`FACTS`]): where
//! it first acts, what a golden must hold for it to show, which parameters are tried for
//! it, what may refute it, and what evidence is said in its own terms. The rest of the
//! crate asks the table; no other module asks "is this fault X?".
//!
//! What the contract itself says of a fault (its ID, the scopes and parameters it takes,
//! its components) stays in `contract::fault`; the tests below check the two agree.

use contract::fault::Fault;
use contract::site::{LayerPart, Site, Step};

/// What a golden must hold for a fault to show on it (see [`crate::first_site`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Needs {
    /// Nothing: every golden gives the fault something to act on.
    Nothing,
    /// A decode step.
    DecodeStep,
    /// A configured rope other than the fault's default form (theta 10000, no scaling).
    OtherRope,
    /// Padding in the prefill.
    Padding,
    /// A real token whose id is the pad id; the fault shows at the first step fed one.
    PadIdToken,
    /// A float16 run of a padded scenario with a second layer to read the padding keys.
    Float16PaddedLayers,
    /// A square projection; the fault shows at the first, in the loader's order.
    SquareProjection,
    /// Grouped heads (1 < nKV < nH), where tiling and grouping differ.
    GroupedHeads,
    /// A LoRA adapter (CONTRACT §5), merged or not.
    Adapter,
    /// A merged LoRA adapter.
    MergedAdapter,
}

/// The parameter sets tried for a family beside its default form.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Grid {
    /// The default form alone.
    DefaultOnly,
    /// Bases with the configured scaling dropped or kept: common bases and the ones
    /// fitted to the candidate's rotary table.
    ThetaAndScaling,
    /// The sliced rotary table.
    SlicedTable,
    /// The decode position offset the candidate's positions show.
    PositionOffset,
    /// Cache slot offsets the decode steps leave room for.
    SlotOffset,
}

/// The evidence a finding states in the fault's own terms, before the fit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Detail {
    /// Nothing beyond the fit.
    None,
    /// The decode positions the candidate was fed, against the golden's.
    Positions,
    /// How many (query, key) pairs the candidate's mask shows, against the golden's.
    MaskPattern,
}

/// The diagnosis's facts about one fault.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Facts {
    pub fault: Fault,
    /// The earliest (step, site) at which the fault can change an activation.
    pub acts_first: (Step, Site),
    /// What a golden must hold for the fault to show.
    pub needs: Needs,
    /// Whether a fault that cannot show on the golden is left out of the diagnosis.
    /// Not so where only its default form cannot show (the other bases of
    /// `rope.wrong_theta` act on any rope).
    pub screened: bool,
    /// Whether the dumped rotary tables, where the candidate matched them, refute the
    /// fault. Not so for `rope.cos_sin_swapped`: a port may swap the tables only where
    /// it applies them.
    pub tables_refute: bool,
    pub grid: Grid,
    pub detail: Detail,
    /// Whether the family is only ever named with a component: its unnarrowed form is
    /// another fault (`lora.target_missing` on every module is `lora.not_loaded`).
    pub component_required: bool,
}

/// A fault acting first at `(step, site)`, that shows on any golden, in its default
/// form only, refuted by every matched site.
const fn acts(fault: Fault, step: Step, site: Site) -> Facts {
    Facts {
        fault,
        acts_first: (step, site),
        needs: Needs::Nothing,
        screened: true,
        tables_refute: true,
        grid: Grid::DefaultOnly,
        detail: Detail::None,
        component_required: false,
    }
}

impl Facts {
    const fn needs(mut self, needs: Needs) -> Facts {
        self.needs = needs;
        self
    }

    const fn grid(mut self, grid: Grid) -> Facts {
        self.grid = grid;
        self
    }

    const fn detail(mut self, detail: Detail) -> Facts {
        self.detail = detail;
        self
    }

    /// Tried even where its default form cannot show.
    const fn unscreened(mut self) -> Facts {
        self.screened = false;
        self
    }

    /// Tried and named only narrowed to a component.
    const fn per_component(mut self) -> Facts {
        self.component_required = true;
        self
    }

    /// Not refuted by the dumped rotary tables.
    const fn tables_free(mut self) -> Facts {
        self.tables_refute = false;
        self
    }
}

const fn layer0(part: LayerPart) -> Site {
    Site::Layer(0, part)
}

/// Every fault's facts, in the contract's order ([`Fault::ALL`]).
pub(crate) static FACTS: [Facts; Fault::ALL.len()] = {
    use Detail::*;
    use Fault::*;
    use Grid::*;
    use LayerPart::*;
    use Needs::*;
    use Site::{Mask, PositionIds, RotaryCos};
    use Step::{Decode, Prefill};
    [
        acts(RopePosReset, Decode(0), PositionIds).needs(DecodeStep).detail(Positions),
        acts(RopePosFixed, Decode(0), PositionIds).needs(DecodeStep).detail(Positions),
        acts(RopePosOffByOne, Decode(0), PositionIds)
            .needs(DecodeStep)
            .grid(PositionOffset)
            .detail(Positions),
        acts(RopeInterleaved, Prefill, layer0(QRope)).grid(SlicedTable),
        acts(RopeCosSinSwapped, Prefill, RotaryCos).tables_free(),
        acts(RopeWrongTheta, Prefill, RotaryCos)
            .needs(OtherRope)
            .unscreened()
            .grid(ThetaAndScaling),
        acts(RopeLowPrecisionAngles, Prefill, RotaryCos),
        acts(MaskNone, Prefill, Mask).detail(MaskPattern),
        acts(MaskInverted, Prefill, Mask).detail(MaskPattern),
        acts(MaskPaddingIgnored, Prefill, Mask).needs(Padding).detail(MaskPattern),
        acts(MaskPadTokenMasked, Prefill, Mask).needs(PadIdToken).detail(MaskPattern),
        acts(MaskFp16Overflow, Prefill, Mask).needs(Float16PaddedLayers),
        acts(NormLayernorm, Prefill, layer0(InputLayernorm)),
        acts(NormBias, Prefill, layer0(InputLayernorm)),
        acts(NormEpsOutside, Prefill, layer0(InputLayernorm)),
        acts(NormNoUpcast, Prefill, layer0(InputLayernorm)),
        acts(NormWeightUnmapped, Prefill, layer0(InputLayernorm)),
        acts(WeightsTransposed, Prefill, layer0(QProj)).needs(SquareProjection),
        acts(WeightsGateUpSwapped, Prefill, layer0(Mlp)),
        acts(KvStale, Decode(0), layer0(KCache)).needs(DecodeStep),
        acts(KvWrongSlot, Decode(0), layer0(KCache)).needs(DecodeStep).grid(SlotOffset),
        acts(KvUnrotatedKeys, Prefill, layer0(KCache)),
        acts(KvGqaTiled, Prefill, layer0(Probs)).needs(GroupedHeads),
        acts(AttnNoScale, Prefill, layer0(Probs)),
        acts(AttnSoftmaxLowPrecision, Prefill, layer0(Probs)),
        acts(LoraScaleAlpha, Prefill, layer0(QProjLora)).needs(Adapter),
        acts(LoraScaleMissing, Prefill, layer0(QProjLora)).needs(Adapter),
        acts(LoraRsloraIgnored, Prefill, layer0(QProjLora)).needs(Adapter),
        acts(LoraPatternIgnored, Prefill, layer0(QProjLora)).needs(Adapter),
        acts(LoraNotLoaded, Prefill, layer0(QProjLora)).needs(Adapter),
        acts(LoraTargetMissing, Prefill, layer0(QProjLora)).needs(Adapter).per_component(),
        acts(LoraGateUpSwapped, Prefill, layer0(GateProjLora)).needs(Adapter),
        acts(LoraMergedLowPrecision, Prefill, layer0(QProjLora)).needs(MergedAdapter),
    ]
};

/// The facts of `fault`.
pub(crate) fn facts(fault: Fault) -> &'static Facts {
    // The table is in the order of the enum (checked by the tests below).
    &FACTS[fault as usize]
}

/// What a training step (CONTRACT §6) must hold for a training fault to show.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum TrainNeeds {
    /// Nothing: every training step shows it.
    Nothing,
    /// A label -100 among those the shifted loss reads (`labels[b][t]`, `t ≥ 1`).
    IgnoredLabels,
    /// A loss scale other than 1.
    LossScale,
    /// A step the golden skipped (its gradients overflowed: `grad_norm` non-finite).
    SkippedStep,
    /// Weight decay and a trainable parameter in the `no_decay` group.
    NoDecayParameter,
    /// Clipping (`max_grad_norm`) that some parameter's own norm would set differently.
    Clipping,
    /// More than one micro-batch.
    MicroBatches,
}

/// Where a training fault first changes the step, by kind of site.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum TrainSite {
    Loss,
    /// The first gradient (`grad.lm_head`), or `grad_norm` where the dump's activation
    /// gradients are unscaled.
    Gradients,
    ParamGrad,
    Update,
}

/// The diagnosis's facts about one training fault.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct TrainFacts {
    pub fault: Fault,
    pub acts_first: TrainSite,
    pub needs: TrainNeeds,
    /// The form that reproduces it from the golden's own tensors, in words.
    pub form: &'static str,
}

const fn train(
    fault: Fault,
    acts_first: TrainSite,
    needs: TrainNeeds,
    form: &'static str,
) -> TrainFacts {
    TrainFacts { fault, acts_first, needs, form }
}

/// Every training fault's facts, in the contract's order ([`Fault::TRAIN`]).
pub(crate) static TRAIN_FACTS: [TrainFacts; Fault::TRAIN.len()] = {
    use Fault::*;
    use TrainNeeds::*;
    use TrainSite::*;
    [
        train(
            TrainLabelsUnshifted,
            Loss,
            Nothing,
            "the loss recomputed from the golden's logits with logits t paired with label t",
        ),
        train(
            TrainIgnoreIndexCounted,
            Loss,
            IgnoredLabels,
            "the loss recomputed from the golden's logits with the -100 positions counted in the mean",
        ),
        train(
            TrainLossScaleKept,
            Gradients,
            LossScale,
            "the golden's gradients times the loss scale, clipped by the scaled norm",
        ),
        train(
            TrainOverflowApplied,
            Update,
            SkippedStep,
            "the golden skipped the step (non-finite grad_norm, updates equal to the weights) and the candidate's updates moved the weights",
        ),
        train(
            TrainWeightDecayEverywhere,
            Update,
            NoDecayParameter,
            "AdamW recomputed from the golden's param_grad and weights with weight decay on the no_decay group too",
        ),
        train(
            TrainClipPerParameter,
            ParamGrad,
            Clipping,
            "the golden's unclipped gradients (param_grad / the global clip coefficient) clipped each by its own norm",
        ),
        train(
            TrainAdamNoBiasCorrection,
            Update,
            Nothing,
            "AdamW recomputed from the golden's param_grad and weights without bias correction",
        ),
        train(
            TrainMicroBatchesSummed,
            Gradients,
            MicroBatches,
            "the golden's gradients times the micro-batch count, clipped by the summed norm",
        ),
    ]
};

/// The facts of training fault `fault`; `None` for an inference fault.
pub(crate) fn train_facts(fault: Fault) -> Option<&'static TrainFacts> {
    TRAIN_FACTS.iter().find(|f| f.fault == fault)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_training_table_holds_every_training_fault_once_in_the_contracts_order() {
        let listed: Vec<Fault> = TRAIN_FACTS.iter().map(|f| f.fault).collect();
        assert_eq!(listed, Fault::TRAIN.to_vec());
        for fault in Fault::TRAIN {
            assert!(fault.is_train() && !Fault::ALL.contains(&fault), "{fault}");
            assert_eq!(train_facts(fault).map(|f| f.fault), Some(fault));
            // A training fault acts on the whole step: no scope, no parameters.
            assert!(!fault.takes_layers() && fault.components().is_empty(), "{fault}");
            assert!(fault.param_names().is_empty(), "{fault}");
        }
        for fault in Fault::ALL {
            assert_eq!(train_facts(fault), None, "{fault}");
        }
        // Only the loss faults act on the loss, and only they are judged there.
        for f in &TRAIN_FACTS {
            let loss =
                matches!(f.fault, Fault::TrainLabelsUnshifted | Fault::TrainIgnoreIndexCounted);
            assert_eq!(f.acts_first == TrainSite::Loss, loss, "{}", f.fault);
        }
    }

    #[test]
    fn the_table_holds_every_contract_fault_once_in_the_contracts_order() {
        let listed: Vec<Fault> = FACTS.iter().map(|f| f.fault).collect();
        assert_eq!(listed, Fault::ALL.to_vec());
        for fault in Fault::ALL {
            assert_eq!(facts(fault).fault, fault, "{fault}");
            assert_eq!(Fault::parse(fault.id()), Some(facts(fault).fault), "{}", fault.id());
        }
    }

    #[test]
    fn each_parameter_grid_tries_exactly_the_parameters_the_contract_gives_its_family() {
        for f in &FACTS {
            let expected: &[&str] = match f.grid {
                Grid::DefaultOnly => &[],
                Grid::ThetaAndScaling => &["theta", "scaling"],
                Grid::SlicedTable => &["table"],
                Grid::PositionOffset | Grid::SlotOffset => &["offset"],
            };
            assert_eq!(f.fault.param_names(), expected, "{}", f.fault);
        }
    }

    #[test]
    fn a_family_that_takes_layers_or_components_first_acts_inside_a_layer() {
        for f in &FACTS {
            if f.fault.takes_layers() || !f.fault.components().is_empty() {
                assert!(matches!(f.acts_first.1, Site::Layer(0, _)), "{}", f.fault);
            }
        }
    }

    #[test]
    fn every_fault_acting_first_in_decode_needs_a_decode_step() {
        for f in &FACTS {
            let decode = matches!(f.acts_first.0, Step::Decode(_));
            assert_eq!(decode, f.needs == Needs::DecodeStep, "{}", f.fault);
            if decode {
                assert_eq!(f.acts_first.0, Step::Decode(0), "{}", f.fault);
            }
        }
    }

    #[test]
    fn position_details_go_with_position_sites_and_mask_details_with_the_mask() {
        for f in &FACTS {
            match f.detail {
                Detail::Positions => assert_eq!(f.acts_first.1, Site::PositionIds, "{}", f.fault),
                Detail::MaskPattern => assert_eq!(f.acts_first.1, Site::Mask, "{}", f.fault),
                Detail::None => {}
            }
        }
    }

    #[test]
    fn only_the_theta_family_is_tried_unseen_and_only_swapped_tables_escape_the_tables() {
        let unscreened: Vec<Fault> =
            FACTS.iter().filter(|f| !f.screened).map(|f| f.fault).collect();
        assert_eq!(unscreened, [Fault::RopeWrongTheta]);
        let free: Vec<Fault> = FACTS.iter().filter(|f| !f.tables_refute).map(|f| f.fault).collect();
        assert_eq!(free, [Fault::RopeCosSinSwapped]);
        // A fault tried where it cannot show has other forms to show with.
        for f in FACTS.iter().filter(|f| !f.screened) {
            assert_ne!(f.grid, Grid::DefaultOnly, "{}", f.fault);
        }
    }
}

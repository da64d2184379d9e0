//! What one step of a run produced: every contract site in compute order
//! ([`StepOutput`]), each shown as it is produced to a [`Watch`] that may stop the run.
//! The model (`llama`) and each decoder layer (`decoder_layer`) write into it.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use ndarray::ArrayD;

use contract::site::{Site, Step};

/// Says, for each site of a run as it is produced, whether the run goes on.
type KeepGoing = dyn Fn(Step, &Site, &ArrayD<f64>) -> bool + Send + Sync;

/// Looks at each site of a run as it is produced and may stop the run: the diagnosis
/// stops a hypothesis as soon as it departs from what the candidate showed, instead of
/// running every layer and step to find out.
pub struct Watch {
    keep_going: Box<KeepGoing>,
    stopped: AtomicBool,
}

impl Watch {
    /// A watch that stops the run the first time `keep_going` returns false.
    pub fn new(
        keep_going: impl Fn(Step, &Site, &ArrayD<f64>) -> bool + Send + Sync + 'static,
    ) -> Watch {
        Watch { keep_going: Box::new(keep_going), stopped: false.into() }
    }

    /// Whether it stopped a run.
    pub fn stopped(&self) -> bool {
        self.stopped.load(Ordering::Relaxed)
    }

    fn check(&self, step: Step, site: &Site, a: &ArrayD<f64>) {
        if !self.stopped() && !(self.keep_going)(step, site, a) {
            self.stopped.store(true, Ordering::Relaxed);
        }
    }
}

impl std::fmt::Debug for Watch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Watch").field("stopped", &self.stopped()).finish_non_exhaustive()
    }
}

/// Every site a step produced, in compute order.
#[derive(Debug, Clone, Default)]
pub struct StepOutput {
    pub sites: Vec<(Site, ArrayD<f64>)>,
    /// The step and the watch its sites are shown to, if any.
    watch: Option<(Step, Arc<Watch>)>,
}

impl StepOutput {
    /// An empty output of `step`, its sites shown to `watch` if any.
    pub(crate) fn new(step: Step, watch: Option<Arc<Watch>>) -> StepOutput {
        StepOutput { sites: Vec::new(), watch: watch.map(|w| (step, w)) }
    }

    pub(crate) fn put<D: ndarray::Dimension>(&mut self, site: Site, a: ndarray::Array<f64, D>) {
        let a = a.into_dyn();
        if let Some((step, w)) = &self.watch {
            w.check(*step, &site, &a);
        }
        self.sites.push((site, a));
    }

    /// Whether a watch has stopped the run: the rest of the step is not computed.
    pub fn stopped(&self) -> bool {
        self.watch.as_ref().is_some_and(|(_, w)| w.stopped())
    }

    /// The tensor of `site`, if produced.
    pub fn get(&self, site: &Site) -> Option<&ArrayD<f64>> {
        self.sites.iter().find(|(s, _)| s == site).map(|(_, a)| a)
    }

    /// The logits `[batch, T, vocab]`.
    pub fn logits(&self) -> Option<&ArrayD<f64>> {
        self.get(&Site::LmHead)
    }
}

//! `parity compare GOLDEN CANDIDATE`: judge a port's dump against the golden.

use std::process::ExitCode;

use llama_parity::dump::Dump;
use llama_parity::pipeline::{self, Options};
use llama_parity::weights::keymap::KeyMap;
use llama_parity::Result;

use crate::args::CompareArgs;
use crate::output::{check_outputs, finish, load_baseline, load_policy, progress};

pub fn cmd_compare(a: CompareArgs) -> Result<ExitCode> {
    let inputs = [a.golden.as_path(), a.candidate.as_path()];
    let policy = load_policy(&a.common)?;
    let baseline = load_baseline(&a.common)?;
    check_outputs(&inputs, &[("--report", a.common.report.as_deref())])?;
    let golden = Dump::open(&a.golden)?;
    let mut candidate = Dump::open(&a.candidate)?;
    if let Some(p) = &a.map {
        let map = KeyMap::load(p)?;
        candidate = candidate.rename_sites(|name| map.to_hf(name))?;
    }
    let opts = Options {
        progress: &progress,
        baseline: baseline.as_ref(),
        max_regression: a.common.max_regression,
        ..Options::new(&policy)
    };
    let report = pipeline::check(&golden, &candidate, None, &opts)?;
    finish(report, &a.common)
}

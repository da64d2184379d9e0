//! `parity run GOLDEN --impl ...`: run an implementation on the golden's scenario and
//! weights, and judge it.

use std::process::ExitCode;

use llama_parity::contract::fault::ScopedFault;
use llama_parity::dump::guard::{self, Output};
use llama_parity::dump::Dump;
use llama_parity::model::mindformers::Device;
use llama_parity::model::{Implementation, RunOptions};
use llama_parity::pipeline;
use llama_parity::{Error, Result};

use crate::args::{DeviceArg, ImplArg, RunArgs};
use crate::output::{
    check_options, common_outputs, finish, floor, load_baseline, load_policy, precision,
    summary_only,
};

pub fn cmd_run(a: RunArgs) -> Result<ExitCode> {
    let implementation = match a.implementation {
        ImplArg::Reference => Implementation::Reference,
        ImplArg::Ascend => Implementation::Ascend,
        ImplArg::Mindspore => Implementation::MindSpore,
        ImplArg::Mindformers => Implementation::MindFormers(match a.device {
            None | Some(DeviceArg::Cpu) => Device::Cpu,
            Some(DeviceArg::Ascend) => Device::Ascend,
        }),
    };
    if a.device.is_some() && !matches!(a.implementation, ImplArg::Mindformers) {
        return Err(Error::Usage {
            flag: "--device".into(),
            what: "only --impl mindformers runs on a chosen device".into(),
        });
    }
    let faults = a
        .faults
        .iter()
        .map(|spec| {
            ScopedFault::parse(spec).map_err(|what| Error::Usage { flag: "--fault".into(), what })
        })
        .collect::<Result<Vec<_>>>()?;
    let dump =
        a.dump.as_deref().map(|dir| Output { label: "--dump", dir, files: guard::DUMP_FILES });
    guard::check_outputs(
        &[Some(a.golden.as_path()), a.common.policy.as_deref(), a.common.baseline.as_deref()]
            .into_iter()
            .flatten()
            .collect::<Vec<_>>(),
        &[common_outputs(&a.common), dump.into_iter().collect()].concat(),
    )?;
    let policy = load_policy(&a.common)?;
    let floor = floor(&a.common)?;
    let golden = Dump::open(&a.golden)?;
    let summary = summary_only(&a.common, &golden)?;
    // Each layer's progress on a terminal, unless -q.
    let context = crate::progress::context(
        std::io::IsTerminal::is_terminal(&std::io::stderr()) && !a.common.quiet,
    );
    let run = RunOptions::new(implementation)
        .with_precision(a.dtype.map(precision))
        .with_faults(faults)
        .with_teacher_force(a.teacher_force)
        .with_context(context.clone());
    let baseline = load_baseline(&a.common)?;
    let opts =
        check_options(&a.common, &policy, floor, baseline.as_ref(), summary.as_ref(), &context);
    let (_, report) = pipeline::run(&golden, &run, a.dump.as_deref(), &opts)?;
    finish(report, &a.common, &policy)
}

//! `parity check-golden GOLDEN`: does the harness reproduce this golden? The check every
//! run makes before it believes a noise floor, alone, for producers to run on a golden
//! before they publish it.

use std::process::ExitCode;

use llama_parity::compare::reproduce::{
    self, Reproduction, ANGLE_BOUND, FLOAT32_BOUND, LOCAL_BOUND,
};
use llama_parity::dump::Dump;
use llama_parity::{Error, Result};

use crate::args::CheckGoldenArgs;

pub fn cmd_check_golden(a: CheckGoldenArgs) -> Result<ExitCode> {
    let golden = Dump::open(&a.golden)?;
    if !golden.has_weights() {
        return Err(Error::Usage {
            flag: "GOLDEN".into(),
            what: format!(
                "{} has neither weights.safetensors nor a checkpoint by reference: the \
                 reference cannot run its scenario",
                a.golden.display()
            ),
        });
    }
    let r = reproduce::check(&golden, &crate::progress::context(false))?;
    print!("{}", render(&r, a.all));
    Ok(if r.is_reproduced() { ExitCode::SUCCESS } else { ExitCode::from(1) })
}

/// The per-site table (every site with `all`, else the unreproduced ones and the ten
/// worst) and the verdict.
fn render(r: &Reproduction, all: bool) -> String {
    let p = r.golden_precision;
    let mut out = format!(
        "golden {} ({p}): the float64 reference, teacher-forced, against every site; a value \
         site is reproduced when rel-L2 <= {LOCAL_BOUND} unit roundoffs of {p} plus \
         {FLOAT32_BOUND} float32 unit roundoffs ({:.3e} together), plus {ANGLE_BOUND} float32 \
         unit roundoffs per position of the largest position fed (the rotary angles' \
         rounding)\n\n",
        r.golden, r.bound
    );
    let mut worst: Vec<usize> =
        (0..r.sites.len()).filter(|&i| r.sites[i].rel_l2.is_some()).collect();
    worst.sort_by(|&a, &b| {
        let key = |i: usize| r.sites[i].rel_l2.unwrap_or(0.0);
        key(b).total_cmp(&key(a))
    });
    worst.truncate(10);
    out.push_str(&format!(
        "{:<9} {:<48} {:>10} {:>8} {:>10} {:>10}  {}\n",
        "step", "site", "rel-L2", "x u", "bound", "cosine", "status"
    ));
    for (i, s) in r.sites.iter().enumerate() {
        if !(all || s.reproduced == Some(false) || worst.contains(&i)) {
            continue;
        }
        let num = |x: Option<f64>, f: &dyn Fn(f64) -> String| x.map_or("-".to_string(), f);
        let status = match s.reproduced {
            Some(true) => "reproduced".to_string(),
            Some(false) => format!(
                "NOT REPRODUCED{}",
                s.note.as_deref().map(|n| format!(" ({n})")).unwrap_or_default()
            ),
            None => format!("not checked ({})", s.note.as_deref().unwrap_or("-")),
        };
        let status = match s.mismatches {
            Some(n) if n > 0 => format!("{status}: {n} entries differ"),
            _ => status,
        };
        out.push_str(&format!(
            "{:<9} {:<48} {:>10} {:>8} {:>10} {:>10}  {status}\n",
            s.step.to_string(),
            s.site.to_string(),
            num(s.rel_l2, &|x| format!("{x:.3e}")),
            num(s.roundoffs(p), &|x| format!("{x:.1}")),
            format!("{:.3e}", s.bound),
            num(s.cosine, &|x| format!("{x:.6}")),
        ));
    }
    if !all {
        out.push_str("(the unreproduced sites and the ten worst; --all lists every site)\n");
    }
    out.push('\n');
    match r.describe_failure() {
        Some(why) => out.push_str(&format!("NOT REPRODUCED at {why}\n")),
        None if r.checked() == 0 => out.push_str("NOT REPRODUCED: no site could be checked\n"),
        None => {
            let worst = r
                .worst()
                .map(|(s, x)| format!("; worst {} {} at {x:.1} unit roundoffs", s.step, s.site))
                .unwrap_or_default();
            out.push_str(&format!("REPRODUCED: {} sites checked{worst}\n", r.checked()));
        }
    }
    out
}

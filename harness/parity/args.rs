//! Command-line arguments as clap sees them. Nothing here reaches the library: the
//! commands turn these into validated library options.

use std::path::PathBuf;

use clap::{Parser, Subcommand, ValueEnum};

/// Prove a Llama port numerically faithful to HuggingFace transformers, layer by layer.
///
/// A dump is a directory with manifest.json and activations (llama-parity/dump@1; see
/// CONTRACT.md). `compare` measures a candidate dump against a golden dump made by HF
/// transformers; `run` produces the candidate itself with one of the built-in
/// implementations and compares it. Both print the first divergence in compute order
/// and can write a report.
///
/// Exit status: 0 every checked site within tolerance, 1 divergence, 2 bad input.
#[derive(Debug, Parser)]
#[command(name = "parity", version, max_term_width = 100)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Compare a candidate dump with a golden dump, site by site.
    #[command(verbatim_doc_comment)]
    ///
    /// Example:
    ///   parity compare golden/gqa_pad_f32 my_port_dump --report reports/my_port
    Compare(CompareArgs),
    /// Run a golden's scenario with a built-in implementation and compare it.
    #[command(verbatim_doc_comment)]
    ///
    /// Examples:
    ///   parity run golden/gqa_pad_f32 --impl reference
    ///   parity run golden/gqa_pad_f32 --impl ascend --dtype bfloat16 --fault rope.pos_reset --report reports/x
    ///   parity run golden/gqa_pad_f32 --impl mindspore --dtype float16 --dump dumps/ms_f16
    ///
    /// --impl mindspore runs fixtures/ports/mindspore/run.py with the interpreter in
    /// $PARITY_MINDSPORE_PYTHON, else <venv>/bin/python, <venv> being $PARITY_MINDSPORE_VENV
    /// or ~/.cache/llama-parity/mindspore-venv (`bash .ci/setup` creates it);
    /// $PARITY_MINDSPORE_PORT overrides the port's run.py.
    /// --impl mindformers runs MindFormers' own Llama (fixtures/ports/mindformers/run.py)
    /// the same way, from $PARITY_MINDFORMERS_PYTHON / $PARITY_MINDFORMERS_VENV or
    /// ~/.cache/llama-parity/mindformers-venv; --device CPU|Ascend picks where.
    Run(RunArgs),
    /// Run every implementation on every golden of a suite, and every faulty candidate
    /// beside it, and print the matrix.
    ///
    /// For each golden under DIR: the float64 reference, and the simulated Ascend port
    /// at bfloat16 and float16 (a correct low-precision port must pass). For each
    /// candidate under fixtures/candidates/<golden>__<fault>/: the comparison with its
    /// golden and the diagnosis, which should name the planted fault. Then the same for
    /// the LoRA set (--adapters), the training set (--training: one training step of
    /// CONTRACT §6 per golden) and, when its goldens are there, the real trained model
    /// with a fault matrix at bfloat16 (--real-model).
    ///
    /// Example:
    ///   parity suite                      (golden/, fixtures/candidates/, the LoRA and training sets, the real model)
    ///   parity suite golden --report reports/suite
    ///   parity suite --mindspore            (the real MindSpore port too)
    #[command(verbatim_doc_comment)]
    Suite(SuiteArgs),
    /// Check a port's checkpoint against the HF weights it was converted from, or its
    /// LoRA adapter checkpoint against the PEFT adapter.
    #[command(verbatim_doc_comment)]
    ///
    /// Maps every HF tensor through the key map (the MindSpore port's map is built in)
    /// and reports HF tensors left unmapped or missing in the port, port tensors no rule
    /// produces (e.g. a LayerNorm beta), shape and dtype mismatches, and values that are
    /// not exactly the HF values cast to the port's dtype, naming a norm weight left at
    /// ones and a square matrix stored transposed.
    ///
    /// LoRA adapters (CONTRACT §5): when HF is a PEFT adapter (a directory holding
    /// adapter_config.json and adapter_model.safetensors, a dump whose manifest names
    /// its `adapter`, or an adapter_model.safetensors with its config beside it), PORT
    /// is the port's adapter checkpoint, with mindpet's names by default:
    ///   base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight [r, in]
    ///     -> model.layers.{i}.attention.wq.mindpet_delta_lora_A [r, in]
    ///   ...lora_B.weight [out, r] -> ...mindpet_delta_lora_B [out, r]
    ///   (wq wk wv wo, feed_forward.w1 w3 w2 for q k v o, gate up down;
    ///   fixtures/ports/mindspore/adapter_keymap.json; mindpet_delta_lora_a/_b, as
    ///   MindSpore 2.10 saves them, match too)
    /// or as --map says (rules from PEFT's tensor names, as stored, to the port's). It
    /// names tensors missing (a module without either: lora.target_missing), extra,
    /// stored transposed (lora_A as [in, r]), holding another module's values (gate and
    /// up traded: lora.gate_up_swapped), a lora_B left at zero, and each module whose
    /// scaling differs: PEFT's from adapter_config.json (alpha/r, alpha/sqrt(r) under
    /// use_rslora, rank_pattern/alpha_pattern) against the port's, declared by
    /// PORT.json beside the checkpoint (the converter's llama-parity/mindpet-adapter@1,
    /// {"modules": {"model.layers.0.attention.wq": {"r", "lora_alpha", "scaling"}}}),
    /// or --port-config, or --lora-alpha (mindpet's pet_config: lora_alpha / r). With
    /// none of them the scalings are listed, not checked. Base-model tensors in the
    /// checkpoint (a whole network's) are skipped.
    ///
    /// Exit status: 0 no finding, 1 any finding, 2 bad input.
    ///
    /// Examples:
    ///   parity check-weights golden/gqa_pad_f32/weights.safetensors model.ckpt
    ///   parity check-weights hf.safetensors model.ckpt --dtype bfloat16 --report reports/weights
    ///   parity check-weights hf.safetensors model.ckpt --map my_keymap.json
    ///   parity check-weights fixtures/lora/golden/lora_f32/adapter adapter.ckpt
    ///   parity check-weights my_peft_adapter/ adapter.ckpt --lora-alpha 16
    CheckWeights(CheckWeightsArgs),
    /// Check that the harness reproduces a golden, before it is published or trusted.
    #[command(verbatim_doc_comment)]
    ///
    /// Runs the float64 reference teacher-forced (each decoder layer from the golden's
    /// own input to it) and holds every site to the golden dtype's rounding: a value
    /// site is reproduced when its rel-L2 is at most 64 unit roundoffs of the golden's
    /// dtype, plus 1024 float32 unit roundoffs (the float32 arithmetic every golden
    /// does) and 4 per position of the largest position fed (the rotary angles);
    /// positions and masks must match exactly. `run` and `compare` make the same
    /// check before they let a noise floor raise a threshold, and exit 2 when it fails.
    ///
    /// Exit status: 0 reproduced, 1 not reproduced (the first such site is named),
    /// 2 bad input (a manifest field or config key the harness does not implement).
    ///
    /// Examples:
    ///   parity check-golden golden/gqa_pad_f32
    ///   parity check-golden golden/gqa_pad_bf16 --all
    CheckGolden(CheckGoldenArgs),
    /// Convert another tool's dump into a contract dump (llama-parity/dump@1).
    #[command(verbatim_doc_comment)]
    ///
    /// msprobe (PyPI mindstudio-probe) tensor-mode dumps, PyTorch (.pt) or MindSpore
    /// (.npy). The model and scenario come from --manifest, else from a manifest.json
    /// beside the msprobe steps. `parity compare GOLDEN MSPROBE_DUMP` reads the same
    /// dumps directly, statistics-mode ones too.
    ///
    /// Example:
    ///   parity import msprobe fixtures/msprobe/gqa_pad_f32 --out /tmp/ms_dump
    Import(ImportArgs),
}

#[derive(Debug, clap::Args)]
pub struct ImportArgs {
    /// The producer of the dump.
    #[arg(value_enum)]
    pub tool: ImportTool,
    /// The dump root (msprobe: the folder holding step*/rank*/dump.json).
    pub dump: PathBuf,
    /// Where to write the contract dump (created).
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,
    /// A contract manifest.json (a golden's) giving the model and scenario.
    #[arg(long, value_name = "FILE")]
    pub manifest: Option<PathBuf>,
    /// Site map: hf (default), mindformers, or a map file (llama-parity/msprobe-map@1).
    #[arg(long = "msprobe-map", value_name = "MAP")]
    pub msprobe_map: Option<String>,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum ImportTool {
    /// msprobe (MindStudio Probe) dumps
    Msprobe,
}

/// Where the repository keeps its LoRA set (`golden/generate.py --lora`).
pub const ADAPTER_SET: &str = "fixtures/lora";

/// Where the repository keeps its training set (`golden/generate.py --train`).
pub const TRAINING_SET: &str = "fixtures/train";

#[derive(Debug, clap::Args)]
pub struct SuiteArgs {
    /// Directory holding one golden dump per subdirectory.
    #[arg(default_value = "golden")]
    pub goldens: PathBuf,
    /// Directory of faulty candidates, named <golden>__<fault id with dots as _>.
    #[arg(long, value_name = "DIR", default_value = "fixtures/candidates")]
    pub candidates: PathBuf,
    /// The LoRA set (CONTRACT §5): DIR/golden and DIR/candidates, planned as the goldens
    /// and candidates above; the default is left out where it does not exist.
    #[arg(long, value_name = "DIR", default_value = ADAPTER_SET)]
    pub adapters: PathBuf,
    /// The training set (CONTRACT §6, one training step): DIR/golden and DIR/candidates,
    /// planned as the goldens and candidates above (the simulated port's float16 step
    /// alone on a golden whose float16 step overflowed and was skipped: at bfloat16 it
    /// does not overflow, a different step); the default is left out where it does not
    /// exist.
    #[arg(long, value_name = "DIR", default_value = TRAINING_SET)]
    pub training: PathBuf,
    /// Also run the real MindSpore port (fixtures/ports/mindspore) on every golden at
    /// float32 and float16, and on the real model's bfloat16 golden at bfloat16 (needs
    /// its venv: see `bash .ci/setup`; about 7 s a run on the suite's goldens).
    #[arg(long)]
    pub mindspore: bool,
    /// The real trained model's goldens: DIR/golden_f32 and DIR/golden_bf16, made by
    /// golden/make_smollm2.py (bash .ci/setup runs it). Default: smollm2-135m in the
    /// models cache ($PARITY_MODELS, else ~/.cache/llama-parity/models). When both are
    /// there the suite runs the reference and the simulated Ascend port (bfloat16,
    /// float16) on them and a fault matrix at bfloat16; when they are not, it says so
    /// and leaves them out.
    #[arg(long, value_name = "DIR")]
    pub real_model: Option<PathBuf>,
    /// Leave the real model out even when its goldens are there.
    #[arg(long, conflicts_with = "real_model")]
    pub no_real_model: bool,
    /// Also run MindFormers' Llama (fixtures/ports/mindformers, float32 on the CPU) on
    /// the real model (needs its venv: see `bash .ci/setup`).
    #[arg(long)]
    pub mindformers: bool,
    /// Only these faults in the real model's matrix (comma-separated IDs; default:
    /// every fault of the matrix).
    #[arg(long, value_name = "IDS", value_delimiter = ',')]
    pub real_faults: Option<Vec<String>>,
    /// Write one report per run into DIR/<golden>/<run>/ and DIR/suite.json.
    #[arg(long, value_name = "DIR")]
    pub report: Option<PathBuf>,
    /// Hold each run against its accepted report in DIR (a previous `suite --report
    /// DIR`: DIR/<golden>/<run>/report.json); a run without one there is not gated.
    #[arg(long, value_name = "DIR")]
    pub baseline: Option<PathBuf>,
    /// With --baseline: how much a site's error may grow beyond its noise.
    #[arg(long, value_name = "F", default_value_t = 2.0)]
    pub max_regression: f64,
}

#[derive(Debug, clap::Args)]
pub struct CheckGoldenArgs {
    /// The golden dump (with weights.safetensors or a checkpoint by reference).
    pub golden: PathBuf,
    /// List every site, not only the unreproduced ones and the ten worst.
    #[arg(long)]
    pub all: bool,
}

#[derive(Debug, clap::Args)]
pub struct CheckWeightsArgs {
    /// The HF weights (safetensors, HF names and layouts): a golden's
    /// `weights.safetensors`, or an HF checkpoint directory (`model.safetensors`, or
    /// shards listed by `model.safetensors.index.json`); or a PEFT adapter: its
    /// directory, a dump with an adapter, or its adapter_model.safetensors.
    pub hf: PathBuf,
    /// The port's MindSpore checkpoint (.ckpt); its adapter checkpoint when HF is a
    /// PEFT adapter.
    pub port: PathBuf,
    /// Key map (llama-parity/keymap@1 JSON) [default: the MindSpore port's, built in;
    /// for an adapter, mindpet's names].
    #[arg(long, value_name = "FILE")]
    pub map: Option<PathBuf>,
    /// Adapters: the port's scaling declaration (llama-parity/mindpet-adapter@1)
    /// [default: PORT.json beside the checkpoint, when there is one].
    #[arg(long, value_name = "FILE", conflicts_with = "lora_alpha")]
    pub port_config: Option<PathBuf>,
    /// Adapters: the port runs mindpet's LoRADense with this lora_alpha on every module
    /// (scaling lora_alpha / r, r each module's rank).
    #[arg(long, value_name = "ALPHA")]
    pub lora_alpha: Option<f64>,
    /// The dtype every port tensor must have [default: any; values are compared after
    /// casting the HF value to the port tensor's dtype].
    #[arg(long, value_enum)]
    pub dtype: Option<DTypeArg>,
    /// Write weights.json into DIR.
    #[arg(long, value_name = "DIR")]
    pub report: Option<PathBuf>,
}

#[derive(Debug, clap::Args)]
pub struct CompareArgs {
    /// The golden dump directory (made by HF transformers), or an msprobe tensor dump
    /// of HF's run with the run's manifest.json beside its step folders.
    pub golden: PathBuf,
    /// The candidate dump directory (made by the port under test), or an msprobe dump.
    pub candidate: PathBuf,
    #[command(flatten)]
    pub common: CommonArgs,
    /// Site name map for contract-layout candidates that name sites their own way (not
    /// for an msprobe CANDIDATE, which takes --msprobe-map): a key map file
    /// (llama-parity/keymap@1) whose rules give the contract name as "hf" and the
    /// candidate's name as "port", with {i} for the layer, e.g.
    /// {"hf": "model.layers.{i}.self_attn.q_proj", "port": "layers.{i}.attention.wq"}.
    #[arg(long, value_name = "FILE")]
    pub map: Option<PathBuf>,
    /// For an msprobe CANDIDATE: which entry holds which site; hf (default),
    /// mindformers, or a map file (llama-parity/msprobe-map@1).
    #[arg(long = "msprobe-map", value_name = "MAP")]
    pub msprobe_map: Option<String>,
}

#[derive(Debug, clap::Args)]
pub struct RunArgs {
    /// The golden dump directory; its manifest gives the model and scenario, its
    /// weights.safetensors the weights.
    pub golden: PathBuf,
    /// Which implementation runs the scenario.
    #[arg(long = "impl", value_enum, value_name = "IMPL")]
    pub implementation: ImplArg,
    /// Compute dtype [default: the golden's; the reference always computes in float64].
    #[arg(long, value_enum)]
    pub dtype: Option<DTypeArg>,
    /// Plant a known porting fault (repeatable), e.g. rope.pos_reset. See CONTRACT.md §3.
    ///
    /// Narrow where it acts with @DIM=VALUE (CONTRACT.md §4), repeatable:
    /// weights.gate_up_swapped@layers=2, kv.stale@layers=1-3@steps=decode.*,
    /// norm.layernorm@component=model.norm, weights.transposed@component=o_proj.
    /// Parameters chain the same way: rope.wrong_theta@theta=500000@scaling=dropped|kept,
    /// rope.interleaved@table=sliced, rope.pos_off_by_one@offset=3, kv.wrong_slot@offset=2.
    /// The reference and ascend implementations plant every scope and parameter a fault
    /// takes; the MindSpore port takes layers only; MindFormers plants faults everywhere.
    #[arg(long = "fault", value_name = "ID[@SCOPE]")]
    pub faults: Vec<String>,
    /// Also run each layer from the golden's input to it, to separate the error a site
    /// adds from the error it inherits.
    #[arg(long)]
    pub teacher_force: bool,
    /// Where --impl mindformers runs (MindSpore's device_target).
    #[arg(long, value_enum, value_name = "DEVICE")]
    pub device: Option<DeviceArg>,
    /// Write the run's own dump here (a contract dump that `parity compare` accepts).
    #[arg(long, value_name = "DIR")]
    pub dump: Option<PathBuf>,
    #[command(flatten)]
    pub common: CommonArgs,
}

#[derive(Debug, clap::Args)]
pub struct CommonArgs {
    /// Write report.json (and the other report files) into DIR.
    #[arg(long, value_name = "DIR")]
    pub report: Option<PathBuf>,
    /// Tolerance policy (JSON) overriding the default thresholds by site and step.
    #[arg(long, value_name = "FILE")]
    pub policy: Option<PathBuf>,
    /// Print only the verdict line and the first divergence.
    #[arg(long, short)]
    pub quiet: bool,
    /// Where measured noise floors are cached, one file per (golden content, dtype)
    /// [default: $PARITY_FLOOR_CACHE, else $XDG_CACHE_HOME/llama-parity/floors, else
    /// ~/.cache/llama-parity/floors].
    #[arg(long, value_name = "DIR", conflicts_with = "no_floor")]
    pub floor_cache: Option<PathBuf>,
    /// Judge by the fixed per-dtype defaults only, without measuring the golden's noise
    /// floor.
    #[arg(long)]
    pub no_floor: bool,
    /// Report a divergence without diagnosing it (no hypothesis runs): the verdict, the
    /// first divergence and where it starts inside the computation, fast.
    #[arg(long)]
    pub no_diagnosis: bool,
    /// Hold this run against an accepted report.json: fail (exit 1) when a site that
    /// passed there fails now, or a site's error grew by more than --max-regression
    /// beyond its noise. Accept a new baseline by copying a report.json (e.g. into
    /// reports/baselines/).
    #[arg(long, value_name = "REPORT")]
    pub baseline: Option<PathBuf>,
    /// With --baseline: how much a site's error may grow beyond its noise (the larger of
    /// one rounding of the dtype and 1% of the site's max_rel_l2) before it regresses.
    #[arg(long, value_name = "F", default_value_t = 2.0)]
    pub max_regression: f64,
    /// For very large dumps: judge each value site first on the Max, Min, Mean and Norm
    /// of both tensors (as msprobe's statistics mode does), and compare in full only the
    /// sites whose statistics disagree, i.e. whose error bounds (|ΔNorm|, sqrt(n)·|ΔMean|
    /// over the golden's Norm; |ΔMax|, |ΔMin|) exceed a tenth of the tolerance, and the
    /// sites named by --full. Each site passed on statistics alone says so in its note
    /// ("statistics only"); its rel_l2 and max_abs are lower bounds and it has no
    /// per-token, per-head or histogram breakdown. Both tensors are still read once
    /// (statistics need every element): it saves the full measures' arithmetic and the
    /// report's breakdowns, not the reading. A fault that keeps a site's statistics
    /// (a permutation of its values) passes there unseen and is caught at the first
    /// site where the statistics move. Not with --baseline, which needs every site's
    /// full error.
    #[arg(long, conflicts_with = "baseline")]
    pub summary_only: bool,
    /// With --summary-only: compare these sites in full anyway (repeatable). A site
    /// name, or STEP/SITE, with * matching any run of characters, as in --policy files:
    /// --full 'model.layers.0.*' --full 'decode.*/lm_head'.
    #[arg(long = "full", value_name = "PATTERN", requires = "summary_only")]
    pub full: Vec<String>,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum ImplArg {
    /// float64 reference written from the formulas
    Reference,
    /// the port's numerics on Ascend simulated on the CPU
    Ascend,
    /// the real MindSpore port (fixtures/ports/mindspore) in a subprocess
    Mindspore,
    /// MindFormers' own Llama (fixtures/ports/mindformers) in a subprocess
    Mindformers,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum DeviceArg {
    #[value(name = "CPU", alias = "cpu")]
    Cpu,
    #[value(name = "Ascend", alias = "ascend")]
    Ascend,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum DTypeArg {
    Float32,
    Bfloat16,
    Float16,
}

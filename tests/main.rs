//! The integration tests, one module a topic; shared helpers live in [`helpers`].
//! Run one topic with `cargo test --release --test main TOPIC::`.

mod helpers;

mod adapters;
mod ascend;
mod bad_inputs;
mod baseline_gate;
mod check_weights;
mod check_weights_adapters;
mod checkpoints;
mod compare_goldens;
mod compare_threads;
mod contract_doc;
mod diagnosis;
mod fault_matrix;
mod golden_suite;
mod hardening;
mod hostile_inputs;
mod hostile_pickles;
mod hostile_runs;
mod loader_fuzz;
mod localisation;
mod lora_ports;
mod mask_properties;
mod mindformers_convert;
mod mindformers_port;
mod mindspore_port;
mod model_properties;
mod msprobe;
mod msprobe_layouts;
mod noise_floor;
mod pass_fail_rule;
mod ports_by_reference;
mod random_models;
mod real_model;
mod reference;
mod replay;
mod report_browser;
mod report_files;
mod reproduction;
mod rope_properties;
mod scoped_faults;
mod suite;
mod summary_only;
mod tensor_parallel;
mod variants;

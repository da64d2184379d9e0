//! What the library's runs say, on stderr: the context every command runs within
//! (the environment's settings, [`RunContext::from_vars`]) and how its events look.
//!
//! A port's lines and the warnings are always shown. The step, the layer and the
//! elapsed time of an in-process run are shown only when asked (`parity run` asks when
//! stderr is a terminal and `-q` is not given, so files and CI logs stay clean), as one
//! line rewritten in place.

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use llama_parity::model::{EventSink, RunContext, RunEvent};

/// The context of a command: the environment's settings, and the events on stderr,
/// with each layer's progress when `layers` is true.
pub fn context(layers: bool) -> RunContext {
    RunContext::from_vars(|k| std::env::var_os(k)).with_events(sink(layers))
}

/// The run being counted: since when, and its name.
struct Counting {
    start: Instant,
    what: String,
}

/// Shows each event on stderr; layers only when `layers` is true.
fn sink(layers: bool) -> EventSink {
    let counting: Mutex<Option<Counting>> = Mutex::new(None);
    Arc::new(move |event: &RunEvent<'_>| match *event {
        RunEvent::PortLine { port, line } => eprintln!("parity: {port}: {line}"),
        RunEvent::Warning { text } => eprintln!("parity: {text}"),
        RunEvent::Started { what } if layers => {
            if let Ok(mut c) = counting.lock() {
                *c = Some(Counting { start: Instant::now(), what: what.to_string() });
            }
        }
        RunEvent::Layer { step, layer, layers: of } if layers => {
            if let Ok(c) = counting.lock() {
                if let Some(c) = c.as_ref() {
                    let t = c.start.elapsed().as_secs_f64();
                    eprint!("\rparity: {}: {step} layer {}/{of}  {t:.1} s   ", c.what, layer + 1);
                    let _ = std::io::stderr().flush();
                }
            }
        }
        RunEvent::Finished if layers => {
            if let Ok(mut c) = counting.lock() {
                if let Some(c) = c.take() {
                    eprintln!(
                        "\rparity: {}: done in {:.1} s          ",
                        c.what,
                        c.start.elapsed().as_secs_f64()
                    );
                }
            }
        }
        RunEvent::Started { .. } | RunEvent::Layer { .. } | RunEvent::Finished => {}
    })
}

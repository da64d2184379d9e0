//! Progress of a long run on stderr: the step, the layer and the elapsed time, one line
//! rewritten in place. Off unless the binary turns it on ([`enable`]), which it does
//! only when stderr is a terminal and `-q` is not given, so files and CI logs stay clean.

use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::Instant;

static ENABLED: AtomicBool = AtomicBool::new(false);
static STATE: Mutex<Option<State>> = Mutex::new(None);

struct State {
    start: Instant,
    what: String,
}

/// Turns progress lines on or off for this process.
pub fn enable(on: bool) {
    ENABLED.store(on, Ordering::Relaxed);
}

fn enabled() -> bool {
    ENABLED.load(Ordering::Relaxed)
}

/// Starts counting a run named `what` (e.g. `reference run`).
pub fn begin(what: &str) {
    if !enabled() {
        return;
    }
    if let Ok(mut s) = STATE.lock() {
        *s = Some(State { start: Instant::now(), what: what.to_string() });
    }
}

/// Reports that `step` (`prefill`, `decode.0`, ...) is at layer `layer` of `layers`.
pub fn layer(step: &str, layer: usize, layers: usize) {
    if !enabled() {
        return;
    }
    if let Ok(s) = STATE.lock() {
        if let Some(s) = s.as_ref() {
            let t = s.start.elapsed().as_secs_f64();
            eprint!("\rparity: {}: {step} layer {}/{layers}  {t:.1} s   ", s.what, layer + 1);
            let _ = std::io::stderr().flush();
        }
    }
}

/// Ends the current run's line.
pub fn end() {
    if !enabled() {
        return;
    }
    if let Ok(mut s) = STATE.lock() {
        if let Some(st) = s.take() {
            eprintln!(
                "\rparity: {}: done in {:.1} s          ",
                st.what,
                st.start.elapsed().as_secs_f64()
            );
        }
    }
}

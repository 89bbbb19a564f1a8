//! Start-up trace: the guest clock (CLOCK_BOOTTIME) at each step from the
//! agent's first instruction in `main` to the agent API listening, logged as
//! one debug line once the agent is ready, so where the start-up time goes
//! can be read from containerd's log (`vmrt.log=debug`) without slowing the
//! start-up itself: marking a step is a vDSO clock read and a push under an
//! uncontended lock, and nothing is written before the API listens.

use std::sync::Mutex;

use crate::server::{boottime_us, STARTED_AT_US};

/// At most this many steps are kept; later marks are dropped.
const MAX_STEPS: usize = 32;

/// `(step, guest CLOCK_BOOTTIME in µs when it ended)`, in order.
static STEPS: Mutex<Vec<(&'static str, u64)>> = Mutex::new(Vec::new());

/// Records that start-up step `step` ended now.
pub fn mark(step: &'static str) {
    let now = boottime_us();
    if let Ok(mut steps) = STEPS.lock() {
        if steps.len() < MAX_STEPS {
            steps.push((step, now));
        }
    }
}

/// The trace as one line: each step with its own duration in ms, e.g.
/// `mount /dev 0.4, console 0.1, ... (total 12.3 ms from main)`. The first
/// step is measured from [`STARTED_AT_US`].
pub fn summary() -> String {
    let steps = STEPS.lock().map(|s| s.clone()).unwrap_or_default();
    format_steps(
        STARTED_AT_US.load(std::sync::atomic::Ordering::Relaxed),
        &steps,
    )
}

/// Formats `steps` (ending times in µs, ascending) relative to `start_us`.
fn format_steps(start_us: u64, steps: &[(&'static str, u64)]) -> String {
    let mut out = String::new();
    let mut prev = start_us;
    for (step, at) in steps {
        if !out.is_empty() {
            out.push_str(", ");
        }
        out.push_str(&format!(
            "{step} {:.1}",
            at.saturating_sub(prev) as f64 / 1000.0
        ));
        prev = *at;
    }
    format!(
        "{out} (total {:.1} ms from main)",
        prev.saturating_sub(start_us) as f64 / 1000.0
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn steps_are_shown_with_their_own_durations() {
        let s = format_steps(
            1_000,
            &[
                ("mount /dev", 1_400),
                ("console", 1_500),
                ("runtime", 4_000),
            ],
        );
        assert_eq!(
            s,
            "mount /dev 0.4, console 0.1, runtime 2.5 (total 3.0 ms from main)"
        );
    }

    #[test]
    fn a_clock_that_goes_back_gives_zero_not_a_wrap() {
        let s = format_steps(5_000, &[("a", 4_000)]);
        assert_eq!(s, "a 0.0 (total 0.0 ms from main)");
    }

    #[test]
    fn marks_are_kept_in_order_and_bounded() {
        for _ in 0..(MAX_STEPS + 5) {
            mark("step");
        }
        let steps = STEPS.lock().unwrap();
        assert_eq!(steps.len(), MAX_STEPS);
        assert!(steps.windows(2).all(|w| w[0].1 <= w[1].1));
    }
}

//! What the unit tests share: the CPU backends they run on and a visible skip.

use burn::backend::{Autodiff, NdArray};

/// The backend of CPU tests.
pub(crate) type TB = NdArray<f32>;
/// [`TB`] with autodiff, for training tests.
pub(crate) type AD = Autodiff<TB>;

/// Says on the real stderr that a test skipped and why. The test harness captures `println!`
/// and `eprintln!`, so a skip printed with them is seen by no one; `.ci/run` counts these lines.
pub(crate) fn test_skip(why: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "SKIP: {why}");
}

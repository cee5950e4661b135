//! Notes for the person at the console while progress bars are drawn: the pipeline's ("reusing
//! …", "failed …") and the training loop's ("resuming … from checkpoint-N") go through one
//! function, so they look the same and reach the console whether the bars are shown or not.

use indicatif::MultiProgress;

/// Prints `line` above the progress bars, or to stderr when they are hidden (output not a
/// terminal); without bars (library use, benchmarks) it goes to the log only.
pub fn say(progress: Option<&MultiProgress>, line: &str) {
    match progress {
        Some(mp) if !mp.is_hidden() => {
            let _ = mp.println(line);
        }
        Some(_) => eprintln!("{line}"),
        None => tracing::info!("{line}"),
    }
}

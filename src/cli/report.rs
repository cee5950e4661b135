//! `runner report [RUN_ID] [--compare RUN_ID2] [--out FILE.html] [--runs-dir DIR]`: writes the
//! HTML report of a run (the latest one by default) and prints its path.

use std::path::PathBuf;

use anyhow::Context as _;

/// Arguments of `runner report`.
#[derive(Debug, Clone, clap::Args)]
pub struct ReportArgs {
    /// Run to report on; the latest run (by start time) when omitted.
    pub run_id: Option<String>,
    /// Second run to compare with: changed parameters, overlaid curves, metrics side by side.
    #[arg(long, value_name = "RUN_ID2")]
    pub compare: Option<String>,
    /// Where to write the page (default: <runs-dir>/<run-id>/report.html).
    #[arg(long, value_name = "FILE.html")]
    pub out: Option<PathBuf>,
    /// Folder holding one folder per run.
    #[arg(long, value_name = "DIR", default_value = ".runner/runs")]
    pub runs_dir: PathBuf,
}

/// Runs `runner report`.
pub fn run(args: &ReportArgs) -> anyhow::Result<()> {
    let run_id = match &args.run_id {
        Some(id) => id.clone(),
        None => runner::report::latest_run_id(&args.runs_dir).with_context(|| {
            format!(
                "no run id given and none found in {}",
                args.runs_dir.display()
            )
        })?,
    };
    let path = runner::report::write_report(
        &args.runs_dir,
        &run_id,
        args.compare.as_deref(),
        args.out.as_deref(),
    )
    .with_context(|| format!("writing the report of run {run_id}"))?;
    println!("{}", path.display());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        report: ReportArgs,
    }

    #[test]
    fn arguments_parse_with_defaults() {
        let cli = Cli::parse_from(["runner"]);
        assert_eq!(cli.report.runs_dir, PathBuf::from(".runner/runs"));
        assert!(
            cli.report.run_id.is_none() && cli.report.compare.is_none() && cli.report.out.is_none()
        );
        let cli = Cli::parse_from([
            "runner",
            "r1",
            "--compare",
            "r2",
            "--out",
            "x.html",
            "--runs-dir",
            "d",
        ]);
        assert_eq!(cli.report.run_id.as_deref(), Some("r1"));
        assert_eq!(cli.report.compare.as_deref(), Some("r2"));
        assert_eq!(cli.report.out, Some(PathBuf::from("x.html")));
        assert_eq!(cli.report.runs_dir, PathBuf::from("d"));
    }
}

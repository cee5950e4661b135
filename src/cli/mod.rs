//! Command-line interface: parses arguments, sets up logging, and maps errors to exit codes
//! (1: a stage failed or an artifact is missing; 2: the recipe or the arguments are wrong).

mod bench;
#[cfg(feature = "cuda")]
mod bench_model;
mod cluster_cmds;
mod export;
mod generate;
mod jobs;
mod pipeline_cmds;
mod report;
mod score;

use clap::{Parser, Subcommand};
use std::process::ExitCode;

#[derive(Parser)]
#[command(
    name = "runner",
    version,
    about = "Reproducible LLM fine-tuning pipelines from TOML recipes",
    long_about = "runner turns a TOML recipe into a pipeline of cached stages: ingest -> format -> \
                  tokenize -> fine-tune -> evaluate -> export. Unchanged stages come from the \
                  content-addressed store under .runner/store."
)]
pub struct Cli {
    /// More logging (-v info, -vv debug); RUNNER_LOG takes a tracing filter.
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    verbose: u8,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a recipe: build every stage the store does not already hold.
    Run(pipeline_cmds::RunArgs),
    /// Show what is cached and what would run, and why.
    Plan(pipeline_cmds::PlanArgs),
    /// Print the recipe's stage graph (dot or mermaid).
    Graph(pipeline_cmds::GraphArgs),
    /// Print the artifact folder of a stage as the recipe stands now (exit 1 if not built).
    Path(pipeline_cmds::PathArgs),
    /// Inspect and maintain the artifact store.
    Cache(pipeline_cmds::CacheArgs),
    /// List recorded runs.
    Runs(pipeline_cmds::RunsArgs),
    /// Run a recorded run's resolved recipe again.
    Rerun(pipeline_cmds::RerunArgs),
    /// Submit a recipe (and parameter sweeps) to Slurm, one job per stage not yet cached.
    Submit(cluster_cmds::SubmitArgs),
    /// State of a run's stages (Slurm jobs: pending, running, done, failed, cancelled, cached).
    Status(cluster_cmds::StatusArgs),
    /// Cancel a submitted run's unfinished jobs.
    Cancel(cluster_cmds::StatusArgs),
    /// Generate text with a model (HF folder or GGUF), greedy or sampled, with s1 budget forcing.
    Generate(generate::GenerateArgs),
    /// Score a predictions file: BLEU-4/ROUGE as ChatGLM-6B's script, sacreBLEU, GSM8K, exact match.
    Score(score::ScoreArgs),
    /// Export a model (merging a LoRA adapter first) as GGUF, safetensors or a PEFT adapter.
    Export(export::ExportArgs),
    /// Convert a GGUF file to an HF folder.
    Convert(export::ConvertArgs),
    /// Write a run's HTML report (latest run by default).
    Report(report::ReportArgs),
    /// State of Slurm jobs by submission folder or job id (or cancel them).
    Jobs(jobs::JobsArgs),
    /// GPU benchmarks (cuBLAS matmul, attention, chunked loss, LoRA SFT, decode) and on-device checks.
    Bench(bench::BenchArgs),
}

/// An error with the exit code it should produce.
pub struct Failure {
    pub code: u8,
    pub error: anyhow::Error,
}

impl<E: Into<anyhow::Error>> From<E> for Failure {
    fn from(e: E) -> Self {
        let error = e.into();
        let code = if error
            .downcast_ref::<runner::recipe::RecipeError>()
            .is_some()
            || matches!(
                error.downcast_ref::<runner::pipeline::PipelineError>(),
                Some(runner::pipeline::PipelineError::Recipe(_))
            ) {
            2
        } else {
            1
        };
        Failure { code, error }
    }
}

fn init_logging(verbose: u8) {
    // cubecl's device thread warns once per queued task after a task panicked (an allocation
    // failure, which runner reports as one error): thousands of lines, so only its errors.
    let default = match verbose {
        0 => "warn,cubecl_common=error",
        1 => "info,cubecl_common=error",
        _ => "debug",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_env("RUNNER_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .try_init();
}

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.verbose);
    let result = match cli.command {
        Command::Run(a) => pipeline_cmds::run(a),
        Command::Plan(a) => pipeline_cmds::plan(a),
        Command::Graph(a) => pipeline_cmds::graph(a),
        Command::Path(a) => pipeline_cmds::path(a),
        Command::Cache(a) => pipeline_cmds::cache(a),
        Command::Runs(a) => pipeline_cmds::runs(a),
        Command::Rerun(a) => pipeline_cmds::rerun(a),
        Command::Submit(a) => cluster_cmds::submit(a),
        Command::Status(a) => cluster_cmds::status(a),
        Command::Cancel(a) => cluster_cmds::cancel(a),
        Command::Generate(a) => generate::run(&a).map_err(Failure::from),
        Command::Score(a) => score::run(&a).map_err(Failure::from),
        Command::Export(a) => export::run(&a).map_err(Failure::from),
        Command::Convert(a) => export::run_convert(&a).map_err(Failure::from),
        Command::Report(a) => report::run(&a).map_err(Failure::from),
        Command::Jobs(a) => jobs::run(&a).map_err(Failure::from),
        Command::Bench(a) => bench::run(&a).map_err(Failure::from),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(f) => {
            if let Some(io) = f.error.downcast_ref::<std::io::Error>() {
                if io.kind() == std::io::ErrorKind::BrokenPipe {
                    return ExitCode::SUCCESS;
                }
            }
            eprintln!("error: {:#}", f.error);
            ExitCode::from(f.code)
        }
    }
}

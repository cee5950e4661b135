//! Timing harness for scripts/bench_score.py (not a test): scores a predictions.jsonl file with
//! the ChatGLM metrics and prints one JSON line with the means and the seconds spent building
//! jieba and scoring. `--threads N` sizes the rayon pool (0 = all cores); `--dump-jieba` prints
//! a JSON object mapping every text to `' '.join(jieba.cut(text))` instead.

use std::path::PathBuf;
use std::time::Instant;

use runner::metrics::predictions::read_pairs;
use runner::metrics::rouge::jieba_join;
use runner::metrics::{chatglm_scores, jieba};

fn main() -> anyhow::Result<()> {
    let mut threads = 0usize;
    let mut dump = false;
    let mut path = None;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--threads" => threads = args.next().unwrap_or_default().parse()?,
            "--dump-jieba" => dump = true,
            _ => path = Some(PathBuf::from(arg)),
        }
    }
    let path = path.ok_or_else(|| {
        anyhow::anyhow!("usage: score_bench [--threads N] [--dump-jieba] FILE.jsonl")
    })?;
    let pairs = read_pairs(&path, "prediction", "reference")?;
    if dump {
        let mut map = serde_json::Map::new();
        for (prediction, reference) in &pairs {
            for text in [prediction, reference] {
                map.insert(text.clone(), jieba_join(text).into());
            }
        }
        println!("{}", serde_json::Value::Object(map));
        return Ok(());
    }
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build_global()?;
    let start = Instant::now();
    jieba();
    let jieba_build_s = start.elapsed().as_secs_f64();
    let start = Instant::now();
    let scores = chatglm_scores(&pairs)?;
    let score_s = start.elapsed().as_secs_f64();
    let mut report = serde_json::to_value(scores)?;
    report["jieba_build_s"] = jieba_build_s.into();
    report["score_s"] = score_s.into();
    println!("{report}");
    Ok(())
}

//! Data parallel training (`crate::dist`) with ranks as threads of this process: the same
//! recipe on 2 or 3 ranks trains exactly as on one, and a checkpoint written by 2 ranks resumes
//! on 1.

use std::path::Path;
use std::sync::Arc;

use super::*;
use crate::dist::{with_group, Collective, LocalGroup};

/// Trains `cfg` on the memorization set on `ranks` threads (rank r in `dirs[r]`), stopping
/// after `stop_after` steps if given; returns rank 0's report.
fn train_on_ranks(
    cfg: &SftConfig,
    dirs: &[&Path],
    stop_after: Option<u64>,
) -> crate::train::SftReport {
    let (config, tensors) = tiny();
    let data = memorization_set();
    let members = LocalGroup::new(dirs.len());
    std::thread::scope(|s| {
        let handles: Vec<_> = members
            .into_iter()
            .zip(dirs)
            .map(|(member, dir)| {
                let (config, tensors, data) = (&config, &tensors, &data);
                s.spawn(move || {
                    let member: Arc<dyn Collective> = member;
                    with_group(member, || {
                        let base = BaseModel::Loaded { config, tensors };
                        run_sft::<AD, [TokenizedExample]>(
                            cfg,
                            base,
                            data,
                            &[],
                            dir,
                            &Default::default(),
                            None,
                            stop_after,
                        )
                    })
                })
            })
            .collect();
        let mut reports: Vec<_> = handles
            .into_iter()
            .map(|h| h.join().expect("a rank panicked").expect("a rank failed"))
            .collect();
        reports.swap_remove(0)
    })
}

fn dp_cfg() -> SftConfig {
    SftConfig {
        // Two micro-batches a step; no dropout, whose RNG the threads would share.
        gradient_accumulation_steps: 2,
        lora_dropout: 0.0,
        ..lora_cfg(6)
    }
}

#[test]
fn two_and_three_ranks_train_exactly_as_one() {
    let _guard = rng_lock();
    let cfg = dp_cfg();
    let one = tempfile::tempdir().unwrap();
    let one_report = train_on_ranks(&cfg, &[one.path()], None);
    let want = losses(one.path());
    assert_eq!(want.len(), 6);
    let want_adapter = read_lora_adapter(&one.path().join("adapter")).unwrap();
    // 3 ranks: the third is dealt no micro-batch and sums zeros.
    for ranks in [2, 3] {
        let dirs: Vec<tempfile::TempDir> =
            (0..ranks).map(|_| tempfile::tempdir().unwrap()).collect();
        let paths: Vec<&Path> = dirs.iter().map(|d| d.path()).collect();
        let report = train_on_ranks(&cfg, &paths, None);
        assert_eq!(losses(paths[0]), want, "{ranks} ranks");
        assert_eq!(report.tokens_seen, one_report.tokens_seen, "{ranks} ranks");
        let adapter = read_lora_adapter(&paths[0].join("adapter")).unwrap();
        assert_eq!(adapter.pairs, want_adapter.pairs, "{ranks} ranks");
        // Only the leader writes.
        for p in &paths[1..] {
            for file in ["metrics.jsonl", "adapter"] {
                assert!(
                    !p.join(file).exists(),
                    "{ranks} ranks: a follower wrote {file}"
                );
            }
        }
    }
}

#[test]
fn a_checkpoint_of_two_ranks_resumes_on_one() {
    let _guard = rng_lock();
    let mut cfg = dp_cfg();
    cfg.save_steps = 3;
    let straight = tempfile::tempdir().unwrap();
    train_on_ranks(&cfg, &[straight.path()], None);

    let (lead, follow) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    train_on_ranks(&cfg, &[lead.path(), follow.path()], Some(4));
    assert!(lead.path().join("checkpoint-3").is_dir());
    assert!(!follow.path().join("checkpoint-3").exists());
    let resumed = SftConfig {
        resume: true,
        ..cfg.clone()
    };
    let report = train_on_ranks(&resumed, &[lead.path()], None);
    assert_eq!(report.resumed_from, Some(3));
    assert_eq!(losses(lead.path()), losses(straight.path()));
    let a = read_lora_adapter(&straight.path().join("adapter")).unwrap();
    let b = read_lora_adapter(&lead.path().join("adapter")).unwrap();
    assert_eq!(a.pairs, b.pairs);
}

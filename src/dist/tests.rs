//! CPU tests of the rank arithmetic, the buckets and the thread group's sums.

use std::sync::Arc;

use super::*;

fn vars(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
    let pairs: Vec<(String, String)> = pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    move |name| {
        pairs
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.clone())
    }
}

#[test]
fn the_world_comes_from_the_first_launcher_convention_present() {
    assert_eq!(World::from_vars(vars(&[])).unwrap(), None);
    let slurm = [
        ("SLURM_PROCID", "5"),
        ("SLURM_NTASKS", "8"),
        ("SLURM_LOCALID", "1"),
    ];
    let w = World::from_vars(vars(&slurm)).unwrap().unwrap();
    assert_eq!((w.rank, w.size, w.local_rank), (5, 8, 1));
    // torchrun's names win over Slurm's, runner's over both.
    let mut both = slurm.to_vec();
    both.extend([("RANK", "1"), ("WORLD_SIZE", "2")]);
    let w = World::from_vars(vars(&both)).unwrap().unwrap();
    assert_eq!((w.rank, w.size, w.local_rank), (1, 2, 0));
    both.extend([("RUNNER_RANK", "0"), ("RUNNER_WORLD_SIZE", "1")]);
    assert_eq!(World::from_vars(vars(&both)).unwrap(), Some(World::SOLO));
}

#[test]
fn a_bad_rank_names_the_variable_and_what_was_expected() {
    let err = World::from_vars(vars(&[("RANK", "two"), ("WORLD_SIZE", "4")])).unwrap_err();
    assert_eq!(
        err.to_string(),
        "environment variable RANK=\"two\": a whole number"
    );
    let err = World::from_vars(vars(&[("RANK", "4"), ("WORLD_SIZE", "4")])).unwrap_err();
    assert!(
        err.to_string().contains("a rank below WORLD_SIZE=4"),
        "{err}"
    );
    let err = World::from_vars(vars(&[("RANK", "0"), ("WORLD_SIZE", "0")])).unwrap_err();
    assert!(err.to_string().contains("WORLD_SIZE"), "{err}");
}

#[test]
fn the_first_host_of_a_slurm_host_list() {
    assert_eq!(first_host("gpu[07-09,12],cpu1").as_deref(), Some("gpu07"));
    assert_eq!(first_host("node3").as_deref(), Some("node3"));
    assert_eq!(first_host("a1,b2").as_deref(), Some("a1"));
    assert_eq!(first_host("n[2,5]").as_deref(), Some("n2"));
    assert_eq!(first_host(""), None);
    assert_eq!(first_host("n[x-y]"), None);
}

#[test]
fn micro_batches_are_dealt_round_robin_and_an_empty_hand_is_idle() {
    let world = |rank, size| World {
        rank,
        size,
        local_rank: rank,
    };
    let owned = |v: &[usize]| MicroBatchShare::Owned(v.to_vec());
    assert_eq!(step_share(5, world(0, 2)), owned(&[0, 2, 4]));
    assert_eq!(step_share(5, world(1, 2)), owned(&[1, 3]));
    assert_eq!(step_share(3, world(2, 4)), owned(&[2]));
    assert_eq!(step_share(3, world(3, 4)), MicroBatchShare::Idle);
    // Every micro-batch goes to exactly one rank.
    for size in 1..6 {
        for n in 0..12 {
            let mut seen = vec![0; n];
            for rank in 0..size {
                if let MicroBatchShare::Owned(v) = step_share(n, world(rank, size)) {
                    v.iter().for_each(|&m| seen[m] += 1);
                }
            }
            assert!(seen.iter().all(|&c| c == 1), "n {n} size {size}");
        }
    }
}

#[test]
fn buckets_cover_every_parameter_once_in_order_under_the_cap() {
    assert_eq!(bucket_ranges(&[], 10), Vec::<std::ops::Range<usize>>::new());
    assert_eq!(bucket_ranges(&[4, 4, 4], 8), vec![0..2, 2..3]);
    // A parameter over the cap is a bucket of its own.
    assert_eq!(bucket_ranges(&[3, 20, 3, 3], 8), vec![0..1, 1..2, 2..4]);
    assert_eq!(bucket_ranges(&[1; 5], 100), vec![0..5]);
}

#[test]
fn a_thread_group_sums_in_rank_order_and_every_rank_gets_the_same_bits() {
    let results = on_ranks(3, |m| {
        let rank = m.world().rank;
        let mut out = Vec::new();
        for round in 0..50 {
            let mut v = vec![rank as f32 + round as f32, 1e8, 1.0 / (rank + 1) as f32];
            m.all_reduce_sum(&mut v).unwrap();
            out.push(v);
        }
        out
    });
    for round in 0..50 {
        let want = vec![(3 * round + 3) as f32, 3e8, 1.0f32 + 1.0 / 2.0 + 1.0 / 3.0];
        for r in &results {
            assert_eq!(r[round], want, "round {round}");
        }
    }
}

#[test]
fn ranks_that_sum_different_lengths_all_get_an_error() {
    let errors = on_ranks(2, |m| {
        let mut v = vec![0.0; 2 + m.world().rank];
        m.all_reduce_sum(&mut v).unwrap_err().to_string()
    });
    for err in errors {
        assert!(err.contains("different lengths [2, 3]"), "{err}");
    }
}

#[test]
fn the_group_is_per_thread_and_restored_after_use() {
    assert!(group().is_none() && is_leader());
    let members = LocalGroup::new(2);
    let follower: Arc<dyn Collective> = members[1].clone();
    with_group(follower, || {
        assert_eq!(group().unwrap().world().rank, 1);
        assert!(!is_leader());
    });
    assert!(group().is_none());
}

/// A port nothing listens on now.
fn free_port() -> u16 {
    std::net::TcpListener::bind(("127.0.0.1", 0))
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn tcp_world(rank: usize, size: usize) -> World {
    World {
        rank,
        size,
        local_rank: rank,
    }
}

#[test]
fn a_tcp_group_sums_like_the_thread_group_and_broadcasts_rank_0s_bytes() {
    let port = free_port();
    let handles: Vec<_> = (0..3)
        .map(|rank| {
            std::thread::spawn(move || {
                let g = TcpGroup::join(tcp_world(rank, 3), "127.0.0.1", port).unwrap();
                let mut id = vec![rank as u8; 4 + rank];
                g.broadcast(&mut id).unwrap();
                let mut out = vec![id.iter().map(|&b| f32::from(b)).sum::<f32>()];
                for round in 0..20 {
                    let mut v = vec![rank as f32 * 0.1 + round as f32, 1.0 / (rank + 1) as f32];
                    g.all_reduce_sum(&mut v).unwrap();
                    out.extend(v);
                }
                out
            })
        })
        .collect();
    let results: Vec<Vec<f32>> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    // Rank 0's four zero bytes everywhere.
    assert!(results.iter().all(|r| r[0] == 0.0));
    for round in 0..20 {
        let want = [
            (0.0f32 + round as f32) + (0.1 + round as f32) + (0.2 + round as f32),
            1.0f32 + 0.5 + 1.0 / 3.0,
        ];
        for r in &results {
            assert_eq!(r[1 + 2 * round..3 + 2 * round], want, "round {round}");
        }
    }
}

#[test]
fn a_tcp_group_reports_different_lengths_on_every_rank() {
    let port = free_port();
    let handles: Vec<_> = (0..2)
        .map(|rank| {
            std::thread::spawn(move || {
                let g = TcpGroup::join(tcp_world(rank, 2), "127.0.0.1", port).unwrap();
                let mut v = vec![1.0; 3 - rank];
                g.all_reduce_sum(&mut v).map_err(|e| e.to_string())
            })
        })
        .collect();
    for h in handles {
        let err = h.join().unwrap().unwrap_err();
        assert!(err.contains("different lengths [3, 2]"), "{err}");
    }
}

#[test]
fn the_visible_gpus_are_the_listed_ones_else_the_drivers() {
    assert_eq!(gpus_visible(None, 8), 8);
    assert_eq!(gpus_visible(Some("2,3"), 8), 2);
    assert_eq!(gpus_visible(Some(""), 8), 0);
}

#[test]
fn each_local_rank_sees_its_own_gpu() {
    assert_eq!(pinned_gpu(None, 3).unwrap().as_deref(), Some("3"));
    assert_eq!(pinned_gpu(Some("4,5,6"), 1).unwrap().as_deref(), Some("5"));
    // Slurm's --gpus-per-task already left one.
    assert_eq!(pinned_gpu(Some("7"), 2).unwrap(), None);
    let err = pinned_gpu(Some("0,1"), 2).unwrap_err().to_string();
    assert!(
        err.contains("CUDA_VISIBLE_DEVICES=\"0,1\": a GPU for local rank 2"),
        "{err}"
    );
}

/// Runs `f` on each member of a fresh thread group of `size` and returns the results by rank.
fn on_ranks<T: Send>(size: usize, f: impl Fn(&dyn Collective) -> T + Sync) -> Vec<T> {
    let members = LocalGroup::new(size);
    std::thread::scope(|s| {
        let handles: Vec<_> = members
            .iter()
            .map(|m| {
                let f = &f;
                s.spawn(move || f(m.as_ref()))
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

#[test]
fn only_rank_0s_word_counts() {
    let said = on_ranks(3, |g| leader_says(g, g.world().rank != 0).unwrap());
    assert_eq!(said, [false; 3]);
    let said = on_ranks(3, |g| leader_says(g, true).unwrap());
    assert_eq!(said, [true; 3]);
}

#[test]
fn statistics_are_summed_and_ranks_logging_other_names_fail() {
    let summed = on_ranks(2, |g| {
        let r = g.world().rank as f64;
        let mut stats = vec![("kl", 1.0 + r, 2.0), ("clip_ratio", r, 1.0)];
        sum_statistics(g, &mut stats).unwrap();
        stats
    });
    assert_eq!(summed[0], [("kl", 3.0, 4.0), ("clip_ratio", 1.0, 2.0)]);
    assert_eq!(summed[0], summed[1]);
    let errors = on_ranks(2, |g| {
        let name = if g.world().rank == 0 { "kl" } else { "lk" };
        let mut stats = vec![(name, 1.0, 1.0)];
        sum_statistics(g, &mut stats).unwrap_err().to_string()
    });
    assert!(errors[0].contains("the statistics' names"), "{errors:?}");
    // Without a group the window is this rank's.
    assert_eq!(sum_logged_window(None, 2.5, 7).unwrap(), (2.5, 7));
}

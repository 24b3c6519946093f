//! The PostgreSQL queue of attempts given to workers (`PgQueue`), on a throwaway cluster of its
//! own (tests/common/pg.rs: a Unix socket, `fsync=off`, so the numbers are the queue's, not the
//! disk's): 20,000 attempts enqueued (1,000 per statement), then taken by 1, 2 and 4 claimers at
//! once, each claiming batches of 64 and finishing what it claimed (one `finish` per attempt, and
//! one `finish_many` per batch): attempts claimed and finished per second, and the latency of
//! one claim (p50, p99). What the scale plan in ARCHITECTURE.md takes from here.
//!
//! Run: `cargo bench --bench queue`.

#[path = "../../tests/common/pg.rs"]
mod pg;

use std::time::{Duration, Instant};

use sluice::ids::{FlowRunId, TaskRunId};
use sluice::store::{NewAttempt, PgDatabase};

const ATTEMPTS: usize = 20_000;
const BATCH: usize = 64;
const LEASE_US: i64 = 30_000_000;

fn main() {
    let cluster = pg::PgCluster::start();
    for (claimers, by_batch) in [(1, false), (1, true), (2, true), (4, true)] {
        let url = cluster.database("queue_bench");
        let queue = PgDatabase::connect(&url)
            .and_then(|db| db.queue())
            .expect("queue");
        let attempts: Vec<NewAttempt> = (0..ATTEMPTS)
            .map(|n| NewAttempt {
                tenant: "bench".into(),
                flow_run: FlowRunId::new(),
                task_run: TaskRunId::new(),
                attempt: 1,
                tags: Vec::new(),
                // About a trivial task's job: its input and context.
                payload: format!("{{\"input\":{n},\"context\":{{}}}}").into_bytes(),
            })
            .collect();
        let began = Instant::now();
        for chunk in attempts.chunks(1_000) {
            queue.enqueue(chunk, 0).expect("enqueue");
        }
        let enqueued = began.elapsed();
        let began = Instant::now();
        let latencies: Vec<Duration> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..claimers)
                .map(|w| {
                    let queue = queue.clone();
                    s.spawn(move || {
                        let worker = format!("w{w}");
                        let mut latencies = Vec::new();
                        loop {
                            let t = Instant::now();
                            let batch = queue
                                .claim(&worker, &[], BATCH, 0, LEASE_US)
                                .expect("claim");
                            latencies.push(t.elapsed());
                            if batch.is_empty() {
                                return latencies;
                            }
                            let leases: Vec<_> = batch.iter().map(|c| c.lease).collect();
                            let done = if by_batch {
                                queue.finish_many(&worker, &leases).expect("finish")
                            } else {
                                leases
                                    .iter()
                                    .map(|&l| queue.finish(&worker, l).expect("finish"))
                                    .collect()
                            };
                            assert!(done.iter().all(|&d| d));
                        }
                    })
                })
                .collect();
            handles
                .into_iter()
                .flat_map(|h| h.join().expect("claimer"))
                .collect()
        });
        let took = began.elapsed();
        assert_eq!(queue.ready().expect("ready"), 0);
        let mut latencies = latencies;
        latencies.sort_unstable();
        let pct = |p: f64| latencies[((latencies.len() - 1) as f64 * p) as usize];
        println!(
            "{claimers} claimer(s): {ATTEMPTS} attempts enqueued in {:.0} ms ({:.0}/s); claimed (batches of {BATCH}) and finished {} in {:.0} ms: {:.0} attempts/s; a claim p50 {:.2} ms, p99 {:.2} ms",
            enqueued.as_secs_f64() * 1e3,
            ATTEMPTS as f64 / enqueued.as_secs_f64(),
            if by_batch { "by batch" } else { "one by one" },
            took.as_secs_f64() * 1e3,
            ATTEMPTS as f64 / took.as_secs_f64(),
            pct(0.5).as_secs_f64() * 1e3,
            pct(0.99).as_secs_f64() * 1e3,
        );
    }
}

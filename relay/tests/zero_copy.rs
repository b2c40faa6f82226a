//! Zero-copy splicing (issue 18) under churn: many pairs of every size through the relay and
//! the agent, both forced onto splice(2), every byte checked; every byte counted as spliced;
//! and no pipe left open once the pairs have ended. A test binary of its own: the pipe count
//! is the whole process's (no other test's pipes in it).
#![cfg(target_os = "linux")]

use std::time::Duration;

use taas_relay::splice::SpliceMode;
use taas_testkit::agent::Agent;
use taas_testkit::echo;
use taas_testkit::prelude::*;

/// Pipes this process holds open.
fn open_pipes() -> usize {
    std::fs::read_dir("/proc/self/fd")
        .unwrap()
        .filter_map(|entry| std::fs::read_link(entry.ok()?.path()).ok())
        .filter(|target| target.to_string_lossy().starts_with("pipe:"))
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn churn_through_the_relay_and_the_agent_on_splice_leaves_no_pipe_open() {
    const CONNECTIONS: u64 = 400;
    const CONCURRENCY: u64 = 16;
    let pipes_before = open_pipes();
    let home = TestLabel::new("home").with("maxParked: 64");
    let relay = TestRelay::start_with(&[&home], |o| o.splice = SpliceMode::Kernel).await;
    let (echo_addr, _echo_task) = echo_server().await;
    let agent = Agent::start(relay.addr(), relay.ca(), &home, echo_addr, 16, |config| {
        config.splice = SpliceMode::Kernel;
    });
    agent
        .wait("parked", Duration::from_secs(20), |s| s.parked == 16)
        .await;
    let q = relay.q("home");
    let mut sent = 0u64;
    for batch in 0..CONNECTIONS / CONCURRENCY {
        let clients: Vec<_> = (0..CONCURRENCY)
            .map(|i| {
                let n = batch * CONCURRENCY + i;
                tokio::spawn(async move {
                    // Mostly small, every 97th 64 KiB, every 1009th 1 MiB; connection 0 too.
                    let data = match n {
                        0 => vec![0x5a; 1024 * 1024],
                        n => echo::payload(18, n),
                    };
                    let back = echo::echo_whole(([127, 0, 0, 1], q).into(), &data).await;
                    assert_eq!(back.len(), data.len(), "connection {n}");
                    assert!(back == data, "connection {n}: bytes differ");
                    data.len() as u64
                })
            })
            .collect();
        for client in clients {
            sent += client.await.unwrap();
        }
    }
    // Every pair ended: its bytes are counted, all of them spliced.
    eventually("every pair counted", || async {
        let text = relay.metrics().await;
        metric(&text, "taas_bytes_total{label=\"home\",kind=\"to_client\"}") >= sent as f64
    })
    .await;
    let text = relay.metrics().await;
    let relayed = metric(&text, "taas_bytes_total{label=\"home\",kind=\"to_server\"}")
        + metric(&text, "taas_bytes_total{label=\"home\",kind=\"to_client\"}");
    assert_eq!(relayed, 2.0 * sent as f64);
    assert_eq!(metric(&text, "taas_spliced_bytes_total"), relayed);
    // The agent's pairs end as the relay's do; then no pipe is left, on either side.
    eventually("no pipe left open", || async {
        open_pipes() <= pipes_before
    })
    .await;
    eprintln!(
        "figure: {CONNECTIONS} pairs, {sent} bytes each way, all spliced; pipes open before \
         {pipes_before}, after {}",
        open_pipes()
    );
}

//! An edge that dies without a word: the routers forget it (their metrics,
//! read here, belong to this test binary alone) and its users resume on
//! another edge without losing anything.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{bail, Result};
use switchyard_tests::churn::{check, connect, read_for, set_up, Plan, Seen};
use switchyard_tests::fleet::{Fleet, TEST_SECRET};
use switchyard_tests::processes::EdgeProcess;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_edge_is_forgotten_and_its_users_resume_elsewhere_without_loss() -> Result<()> {
    let fleet = Fleet::start_custom(|r| r.edge_timeout = Duration::from_millis(1500), |_| {}).await?;
    let logs = tempfile::tempdir()?;
    let mut doomed = EdgeProcess::start("edge-doomed", &fleet.nats.url(), TEST_SECRET, &[], logs.path()).await?;
    let mut plan = Plan::new(6);
    set_up(&fleet.ws_url(), &plan).await?;
    let mut seen: BTreeMap<String, Seen> = plan.users.iter().map(|u| (u.clone(), Seen::default())).collect();
    let mut on_doomed = Vec::new();
    for u in &plan.users {
        let s = seen.get_mut(u).expect("user");
        on_doomed.push(connect(&doomed.ws_url(), u, s).await?);
    }
    for n in 0..20u64 {
        let (tail, body) = plan.event(n);
        fleet.publish(&tail, &body).await?;
    }
    fleet.settle().await?;
    for (u, c) in plan.users.iter().zip(on_doomed.iter_mut()) {
        let s = seen.get_mut(u).expect("user");
        let want = plan.owed[u].len();
        let until = tokio::time::Instant::now() + Duration::from_secs(20);
        while s.durable.len() < want && tokio::time::Instant::now() < until {
            read_for(c, s, Duration::from_millis(100)).await?;
        }
    }
    // The edge dies without a word; events keep coming while its users are away.
    doomed.process.kill()?;
    drop(on_doomed);
    for n in 20..60u64 {
        let (tail, body) = plan.event(n);
        fleet.publish(&tail, &body).await?;
    }
    fleet.settle().await?;
    // The routers forget it: only the surviving edge is counted.
    let admin = fleet.router.as_ref().expect("router").admin_addr;
    let until = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let (_, metrics) = switchyard_tests::fleet::http_get(admin, "/metrics").await?;
        if switchyard_tests::fleet::metric(&metrics, "switchyard_router_edges") == 1.0 {
            break;
        }
        if tokio::time::Instant::now() > until {
            bail!("the dead edge was not forgotten");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Its users resume on the other edge and miss nothing.
    for u in &plan.users {
        let s = seen.get_mut(u).expect("user");
        let mut c = connect(&fleet.ws_url(), u, s).await?;
        read_for(&mut c, s, Duration::from_millis(100)).await?;
    }
    check(&plan, &seen);
    fleet.shutdown().await;
    Ok(())
}

//! Test harness and developer tools for Switchyard.
//!
//! Integration tests run against real parts only: a real `nats-server`
//! process per test ([`nats_server`]), a router and an edge started
//! in-process on ephemeral ports ([`fleet`]), and real WebSocket clients
//! over real sockets ([`ws_client`]). The binaries in `src/bin` (the tail
//! client, the demo producer, the dev token minter) are built on the same
//! pieces.
//!
//! # Layout
//! - [`nats_server`]: start/stop/restart a real nats-server on a free loopback port.
//! - [`churn`]: clients that come and go against a plan of who is owed which durable event.
//! - [`fleet`]: nats-server + router + edge, wired together, plus a producer helper.
//! - [`ws_client`]: a small protocol-level WebSocket client (MessagePack or JSON).
//! - [`deflate_client`]: a raw WebSocket client that offers permessage-deflate (tungstenite cannot).
//! - [`tokens`]: HS256 test and dev tokens.
//! - [`processes`]: the router and edge binaries as child processes (SIGTERM, SIGKILL, restart).
//! - [`nats_cluster`]: a 3-node nats-server cluster with JetStream on loopback.
//! - [`loadgen`]: the load generator behind `switchyard-loadgen` (scenarios W1–W4).

pub mod churn;
pub mod deflate_client;
pub mod fleet;
pub mod loadgen;
pub mod nats_cluster;
pub mod nats_server;
pub mod processes;
pub mod tokens;
pub mod ws_client;

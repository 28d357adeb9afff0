//! `switchyard-token`: mints an HS256 token for local development and tests.
//!
//! Defaults to the edge's built-in dev secret, so it works against an edge
//! started with `--dev-insecure` and no key.

use clap::Parser;
use serde_json::json;
use switchyard_edge::config::DEV_JWT_SECRET;
use switchyard_tests::tokens::token;

#[derive(Parser)]
#[command(about = "Mint an HS256 token for a Switchyard edge")]
struct Args {
    /// The user id (`sub`).
    #[arg(long, default_value = "demo")]
    sub: String,
    /// Lifetime in seconds.
    #[arg(long, default_value_t = 3600)]
    ttl_s: i64,
    /// HMAC secret (defaults to the dev secret).
    #[arg(long, env = "SWITCHYARD_JWT_SECRET", hide_env_values = true, default_value = DEV_JWT_SECRET)]
    secret: String,
    /// Rooms the user may join (names or `prefix:*`), comma separated.
    #[arg(long, value_delimiter = ',')]
    rooms: Vec<String>,
}

fn main() {
    let a = Args::parse();
    println!("{}", token(&a.secret, &a.sub, a.ttl_s, json!({"rooms": a.rooms})));
}

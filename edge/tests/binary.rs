//! The `switchyard-edge` binary itself, not the library: a configuration
//! that cannot work exits with code 64 and names the setting to fix.
//!
//! Having an integration test here also makes `cargo test --workspace`
//! build the binary, which the process-based fleet test
//! (`tests/tests/fleet_processes.rs`) runs.

use std::process::Command;

#[test]
fn refuses_to_start_without_a_key_and_exits_64() {
    let out = Command::new(env!("CARGO_BIN_EXE_switchyard-edge"))
        .env_clear()
        .env("SWITCHYARD_LISTEN", "127.0.0.1:0")
        .env("SWITCHYARD_ADMIN_LISTEN", "127.0.0.1:0")
        .output()
        .expect("running switchyard-edge");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "stderr: {stderr}");
    assert!(stderr.contains("SWITCHYARD_JWT_SECRET"), "stderr: {stderr}");
}

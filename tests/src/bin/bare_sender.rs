//! The floor under every per-delivery CPU figure in `docs/BENCHMARKS.md`:
//! what writing one small WebSocket frame to a loopback TCP socket costs
//! the sending process on this machine, with nothing else around it.
//!
//! `switchyard-bare-sender [--frames N] [--size BYTES] [--per-write K]`
//!
//! It starts a copy of itself as the reader (another process, so the
//! reader's CPU is not counted), writes `N` binary frames of `BYTES` payload
//! bytes (2-byte header, unmasked, as a server sends) in `write(2)` calls
//! of `K` frames each, and prints the sender's user + system CPU per frame
//! and per write. On loopback the kernel does much of the receive side in
//! the sender's context, as it does for an edge, so the two compare.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::time::Instant;

use anyhow::{Context, Result};
use clap::Parser;

/// Command-line options.
#[derive(Parser, Debug)]
#[command(about = "CPU per small frame written to a loopback socket (the bare-sender floor)")]
struct Args {
    /// Frames to write.
    #[arg(long, default_value_t = 2_000_000)]
    frames: u64,
    /// Payload bytes per frame (at most 125).
    #[arg(long, default_value_t = 100)]
    size: usize,
    /// Frames per write(2) call.
    #[arg(long, default_value_t = 1)]
    per_write: usize,
    /// Internal: run as the reader, connecting to this port.
    #[arg(long, hide = true)]
    reader: Option<u16>,
}

/// User + system CPU seconds of this process so far (`/proc/self/stat`, clock ticks of 10 ms).
fn cpu_seconds() -> Result<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat")?;
    // Fields after the command name (which may contain spaces) start after the last ')'.
    let rest = stat.rsplit_once(')').context("stat format")?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the whole line: 12 and 13 after ')'.
    let utime: f64 = fields.get(11).context("utime")?.parse()?;
    let stime: f64 = fields.get(12).context("stime")?.parse()?;
    Ok((utime + stime) / 100.0)
}

fn read_all(port: u16) -> Result<()> {
    let mut s = TcpStream::connect(("127.0.0.1", port))?;
    let mut buf = vec![0u8; 256 * 1024];
    while s.read(&mut buf)? > 0 {}
    Ok(())
}

fn main() -> Result<()> {
    let args = Args::parse();
    if let Some(port) = args.reader {
        return read_all(port);
    }
    anyhow::ensure!(args.size <= 125, "--size must be at most 125 (one-byte length)");
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let port = listener.local_addr()?.port();
    let mut reader = std::process::Command::new(std::env::current_exe()?)
        .args(["--reader", &port.to_string()])
        .spawn()?;
    let (mut s, _) = listener.accept()?;
    s.set_nodelay(true)?;
    let mut frame = vec![0x82u8, args.size as u8];
    frame.extend(std::iter::repeat_n(b'x', args.size));
    let chunk: Vec<u8> = frame.repeat(args.per_write.max(1));
    let writes = args.frames / args.per_write.max(1) as u64;
    let (cpu0, t0) = (cpu_seconds()?, Instant::now());
    for _ in 0..writes {
        s.write_all(&chunk)?;
    }
    let (cpu1, wall) = (cpu_seconds()?, t0.elapsed());
    drop(s);
    reader.wait()?;
    let frames = writes * args.per_write.max(1) as u64;
    let cpu_us = (cpu1 - cpu0) * 1e6;
    println!(
        "{{\"frames\":{frames},\"payload_bytes\":{},\"frames_per_write\":{},\"wall_s\":{:.3},\"sender_cpu_s\":{:.3},\"cpu_us_per_frame\":{:.3},\"cpu_us_per_write\":{:.3},\"load_average\":\"{}\"}}",
        args.size,
        args.per_write,
        wall.as_secs_f64(),
        cpu1 - cpu0,
        cpu_us / frames as f64,
        cpu_us / writes as f64,
        std::fs::read_to_string("/proc/loadavg")?.split_whitespace().take(3).collect::<Vec<_>>().join(" ")
    );
    Ok(())
}

//! The demo page on the edge's WebSocket port: off by default, files only from
//! inside the configured directory, and the dev-token endpoint only on a
//! dev-mode edge without a key.

use anyhow::Context;
use serde_json::{json, Value};
use switchyard_tests::fleet::Fleet;
use switchyard_tests::ws_client::WsClient;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

type R = anyhow::Result<()>;

/// A raw HTTP/1.1 request: status, lower-cased head, body.
async fn get(addr: std::net::SocketAddr, method: &str, path: &str) -> anyhow::Result<(u16, String, Vec<u8>)> {
    let mut s = tokio::net::TcpStream::connect(addr).await?;
    s.write_all(format!("{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes())
        .await?;
    let mut out = Vec::new();
    tokio::time::timeout(std::time::Duration::from_secs(10), s.read_to_end(&mut out)).await??;
    let split = out
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .context("no end of head")?;
    let head = String::from_utf8_lossy(&out[..split]).to_ascii_lowercase();
    let status = head.split_whitespace().nth(1).context("no status line")?.parse()?;
    Ok((status, head, out[split + 4..].to_vec()))
}

/// A demo directory beside a secret file that must never be served.
fn demo_tree() -> anyhow::Result<tempfile::TempDir> {
    let root = tempfile::tempdir()?;
    let demo = root.path().join("demo");
    std::fs::create_dir_all(demo.join("assets"))?;
    std::fs::write(demo.join("index.html"), "<!doctype html><title>demo</title>")?;
    std::fs::write(demo.join("app.js"), "console.log('hi')")?;
    std::fs::write(demo.join("assets/style.css"), "body{}")?;
    std::fs::write(demo.join(".env"), "SECRET=1")?;
    std::fs::write(root.path().join("secret.txt"), "TOP SECRET")?;
    std::os::unix::fs::symlink(root.path().join("secret.txt"), demo.join("link.txt"))?;
    Ok(root)
}

#[tokio::test]
async fn demo_is_off_by_default() -> R {
    let fleet = Fleet::start_with(|c| c.dev_insecure = true).await?;
    let addr = fleet.edge.as_ref().unwrap().ws_addr;
    for path in ["/demo", "/demo/", "/demo/index.html", "/demo/token?sub=alice"] {
        assert_eq!(get(addr, "GET", path).await?.0, 404, "{path}");
    }
    fleet.shutdown().await;
    Ok(())
}

#[tokio::test]
async fn serves_files_with_content_types_and_refuses_traversal() -> R {
    let tree = demo_tree()?;
    let dir = tree.path().join("demo");
    let fleet = Fleet::start_with(|c| c.demo_dir = Some(dir.clone())).await?;
    let addr = fleet.edge.as_ref().unwrap().ws_addr;

    let (status, head, body) = get(addr, "GET", "/demo/").await?;
    assert_eq!(status, 200);
    assert!(head.contains("content-type: text/html; charset=utf-8"), "{head}");
    assert_eq!(body, b"<!doctype html><title>demo</title>");
    let (status, head, _) = get(addr, "GET", "/demo/app.js").await?;
    assert_eq!(status, 200);
    assert!(head.contains("content-type: text/javascript"), "{head}");
    assert!(head.contains("x-content-type-options: nosniff"), "{head}");
    let (status, head, _) = get(addr, "GET", "/demo/assets/style.css").await?;
    assert_eq!(status, 200);
    assert!(head.contains("content-type: text/css"), "{head}");
    let (status, head, body) = get(addr, "HEAD", "/demo/app.js").await?;
    assert_eq!(status, 200);
    assert!(body.is_empty() && head.contains("content-length: 17"), "{head}");
    let (status, head, _) = get(addr, "GET", "/demo").await?;
    assert_eq!(status, 308);
    assert!(head.contains("location: /demo/"), "{head}");
    assert_eq!(get(addr, "POST", "/demo/app.js").await?.0, 405);

    for path in [
        "/demo/../secret.txt",
        "/demo/assets/../../secret.txt",
        "/demo/%2e%2e/secret.txt",
        "/demo/..%2fsecret.txt",
        "/demo/%2E%2E%2Fsecret.txt",
        "/demo/..\\secret.txt",
        "/demo//secret.txt",
        "/demo/link.txt",
        "/demo/.env",
        "/demo/missing.js",
        "/demo/assets",
    ] {
        let (status, _, body) = get(addr, "GET", path).await?;
        assert_eq!(status, 404, "{path}");
        assert!(!String::from_utf8_lossy(&body).contains("SECRET"), "{path} leaked");
    }
    // The token endpoint does not exist on an edge with a real key.
    assert_eq!(get(addr, "GET", "/demo/token?sub=alice").await?.0, 404);
    // WebSocket and other paths behave as before.
    assert_eq!(get(addr, "GET", "/ws").await?.0, 426);
    assert_eq!(get(addr, "GET", "/demox").await?.0, 404);
    fleet.shutdown().await;
    Ok(())
}

#[tokio::test]
async fn dev_tokens_only_in_dev_mode_and_they_connect() -> R {
    let tree = demo_tree()?;
    let dir = tree.path().join("demo");
    let fleet = Fleet::start_with(|c| {
        c.demo_dir = Some(dir.clone());
        c.dev_insecure = true;
        c.jwt_secret = None;
    })
    .await?;
    let addr = fleet.edge.as_ref().unwrap().ws_addr;
    let (status, head, body) = get(addr, "GET", "/demo/token?sub=alice&ttl_s=60").await?;
    assert_eq!(status, 200);
    assert!(head.contains("content-type: application/json"), "{head}");
    assert!(head.contains("cache-control: no-store"), "{head}");
    let minted: Value = serde_json::from_slice(&body)?;
    assert_eq!(minted["sub"], "alice");
    let now = switchyard_tests::tokens::now_s();
    let exp = minted["exp"].as_u64().context("exp")?;
    assert!(exp > now && exp <= now + 61, "exp {exp} now {now}");
    let token = minted["token"].as_str().context("token")?;
    let (_c, ready) = WsClient::connect_ready(&fleet.ws_url(), token, &["switchyard.v1.json"]).await?;
    assert_eq!(ready["user"], "alice");

    for bad in [
        "/demo/token?sub=a.b",
        "/demo/token?sub=",
        "/demo/token?ttl_s=99999",
        "/demo/token?ttl_s=x",
    ] {
        assert_eq!(get(addr, "GET", bad).await?.0, 400, "{bad}");
    }
    let (status, _, body) = get(addr, "GET", "/demo/token").await?;
    assert_eq!(status, 200);
    assert_eq!(serde_json::from_slice::<Value>(&body)?["sub"], json!("demo"));
    fleet.shutdown().await;
    Ok(())
}

// Takes a screenshot of a running demo page in headless Chromium once it
// shows events: node scripts/screenshot.mjs [URL] [OUT.png]
// (defaults: http://127.0.0.1:8080/demo/ and demo.png). With scripts/dev.sh running.
import { chromium } from "playwright-core";

const url = process.argv[2] ?? "http://127.0.0.1:8080/demo/";
const out = process.argv[3] ?? "demo.png";
const browser = await chromium.launch({
  executablePath: process.env.SWITCHYARD_CHROMIUM ?? "/usr/bin/chromium",
  headless: true,
  args: ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking", "--disable-component-update", "--disable-sync"],
});
try {
  const page = await browser.newPage({ viewport: { width: 1280, height: 900 } });
  await page.goto(url);
  // Wait until ticks fill the watchlist and a few alerts have arrived.
  await page.waitForFunction(() => window.switchyardDemo?.ticks >= 20 && window.switchyardDemo.alertIds.length >= 3, null, {
    timeout: 60_000,
  });
  await page.waitForTimeout(500);
  await page.screenshot({ path: out });
  console.log(`screenshot: ${out}`);
} finally {
  await browser.close();
}

// Builds the package: type-checks and emits dist/*.js + .d.ts with tsc,
// bundles the browser build (dist/switchyard.min.js, global `Switchyard`)
// with esbuild, and assembles the demo page in dist/demo/.
// Any compiler or bundler warning fails the build.
import { spawnSync } from "node:child_process";
import { cpSync, mkdirSync, readFileSync, rmSync } from "node:fs";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";
import { gzipSync } from "node:zlib";
import * as esbuild from "esbuild";

const root = join(dirname(fileURLToPath(import.meta.url)), "..");
const dist = join(root, "dist");
const tsc = join(root, "node_modules", ".bin", "tsc");

function run(cmd, args) {
  const r = spawnSync(cmd, args, { cwd: root, stdio: "inherit" });
  if (r.status !== 0) {
    console.error(`build: ${cmd} ${args.join(" ")} failed`);
    process.exit(1);
  }
}

async function bundle(options) {
  const result = await esbuild.build({ logLevel: "silent", bundle: true, target: "es2020", ...options });
  const problems = [...result.errors, ...result.warnings];
  if (problems.length > 0) {
    const text = await esbuild.formatMessages(problems, { kind: "warning" });
    console.error(text.join("\n"));
    process.exit(1);
  }
}

rmSync(dist, { recursive: true, force: true });
run(tsc, ["-p", "tsconfig.json"]);
run(tsc, ["-p", "tsconfig.demo.json"]);

await bundle({
  entryPoints: [join(root, "src", "index.ts")],
  outfile: join(dist, "switchyard.min.js"),
  format: "iife",
  globalName: "Switchyard",
  platform: "browser",
  minify: true,
  legalComments: "none",
});
await bundle({
  entryPoints: [join(root, "src", "index.ts")],
  outfile: join(dist, "switchyard.esm.min.js"),
  format: "esm",
  platform: "browser",
  minify: true,
  legalComments: "none",
});

const demo = join(dist, "demo");
mkdirSync(demo, { recursive: true });
await bundle({
  entryPoints: [join(root, "demo", "demo.ts")],
  outfile: join(demo, "demo.js"),
  format: "iife",
  platform: "browser",
  minify: false,
});
for (const f of ["index.html", "demo.css"]) cpSync(join(root, "demo", f), join(demo, f));
cpSync(join(dist, "switchyard.min.js"), join(demo, "switchyard.min.js"));

const min = readFileSync(join(dist, "switchyard.min.js"));
console.log(
  `build: dist/switchyard.min.js ${min.length} bytes minified, ${gzipSync(min, { level: 9 }).length} bytes minified+gzipped; demo in dist/demo/`,
);

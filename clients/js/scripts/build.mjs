// Builds the package: type-checks and emits dist/*.js + .d.ts with tsc
// (dist/react.js is the `@switchyard/client/react` entry), bundles the
// browser build (dist/switchyard.min.js, global `Switchyard`) with esbuild,
// checks that the React entry bundles with `react` left to the application
// and that the main bundles do not pull React in, and assembles the demo
// page in dist/demo/.
// Any compiler or bundler warning fails the build.
import { spawnSync } from "node:child_process";
import { cpSync, existsSync, mkdirSync, readFileSync, rmSync } from "node:fs";
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
  return result;
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

// The React entry: emitted by tsc, bundled here only to check it (React stays the application's).
for (const f of ["react.js", "react.d.ts"]) {
  if (!existsSync(join(dist, f))) {
    console.error(`build: dist/${f} is missing`);
    process.exit(1);
  }
}
const reactCheck = await bundle({
  entryPoints: [join(root, "src", "react.ts")],
  format: "esm",
  platform: "browser",
  minify: true,
  external: ["react"],
  write: false,
  metafile: true,
});
const reactBytes = reactCheck.outputFiles[0].contents.length;
for (const f of ["switchyard.min.js", "switchyard.esm.min.js"]) {
  const text = readFileSync(join(dist, f), "utf8");
  if (/\breact\b/.test(text) && text.includes("useSyncExternalStore")) {
    console.error(`build: dist/${f} pulled in the React bindings`);
    process.exit(1);
  }
}

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
  `build: dist/switchyard.min.js ${min.length} bytes minified, ${gzipSync(min, { level: 9 }).length} bytes minified+gzipped; ` +
    `React entry (dist/react.js) ${reactBytes} bytes minified with the client, without React; demo in dist/demo/`,
);

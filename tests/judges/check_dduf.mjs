// Runs the npm @huggingface/dduf checker (huggingface.js) on one archive and
// prints what it found as JSON: {"version", "entries": [{name, size,
// fileHeaderOffset}]} or {"version", "error"}. The checker comes from
// $TORCHSER_NODE_MODULES (tests/judges/setup.sh installs it, pinned).
//
// Usage: TORCHSER_NODE_MODULES=DIR node check_dduf.mjs ARCHIVE
import { openAsBlob } from "node:fs";
import { createRequire } from "node:module";
import path from "node:path";

const modules = process.env.TORCHSER_NODE_MODULES;
if (!modules) {
  console.error("check_dduf.mjs: TORCHSER_NODE_MODULES is not set");
  process.exit(2);
}
const require = createRequire(path.join(path.resolve(modules), "noop.js"));
const { checkDDUF } = require("@huggingface/dduf");
const { version } = require("@huggingface/dduf/package.json");

const blob = await openAsBlob(process.argv[2]);
const entries = [];
try {
  for await (const entry of checkDDUF(blob)) {
    entries.push({ name: entry.name, size: entry.size, fileHeaderOffset: entry.fileHeaderOffset });
  }
  console.log(JSON.stringify({ version, entries }));
} catch (e) {
  console.log(JSON.stringify({ version, error: String(e && e.message ? e.message : e) }));
}

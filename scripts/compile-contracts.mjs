#!/usr/bin/env node
// Compiles contracts/*.sol with the pinned solc (npm `solc`) and OpenZeppelin from node_modules,
// and writes one artifact per deployable contract to contracts/build/<Name>.json.
//
//   node scripts/compile-contracts.mjs          write the artifacts
//   node scripts/compile-contracts.mjs --check  exit 1 if recompiling differs from the committed artifacts
//
// The output is a pure function of the sources, the compiler version and SETTINGS below (source unit
// names are repository-relative, keys are written in a fixed order), so the check is byte-exact.
import { readFileSync, readdirSync, writeFileSync, existsSync, mkdirSync } from "node:fs";
import { dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";
import { createRequire } from "node:module";

const ROOT = resolve(dirname(fileURLToPath(import.meta.url)), "..");
const CONTRACTS_DIR = join(ROOT, "contracts");
const BUILD_DIR = join(CONTRACTS_DIR, "build");
const NODE_MODULES = join(ROOT, "node_modules");
// Contracts that get an artifact; interfaces and libraries are compiled as their dependencies.
const DEPLOYABLE = ["GpgpuEscrow", "MockStablecoin"];
const SETTINGS = {
  evmVersion: "cancun",
  optimizer: { enabled: true, runs: 10000 },
  viaIR: true,
  metadata: { bytecodeHash: "ipfs" },
  outputSelection: { "*": { "*": ["abi", "evm.bytecode.object", "evm.deployedBytecode.object", "metadata"] } },
};

const require = createRequire(import.meta.url);
let solc;
try {
  solc = require(join(NODE_MODULES, "solc"));
} catch {
  console.error("solc is not installed: run `npm ci` at the repository root first.");
  process.exit(2);
}

function findImports(path) {
  // Only package imports are resolved from node_modules; relative imports are already source unit names.
  const file = path.startsWith("contracts/") ? join(ROOT, path) : join(NODE_MODULES, path);
  if (!existsSync(file)) return { error: `not found: ${path}` };
  return { contents: readFileSync(file, "utf8") };
}

function compile() {
  const sources = {};
  for (const name of readdirSync(CONTRACTS_DIR).filter((f) => f.endsWith(".sol")).sort()) {
    sources[`contracts/${name}`] = { content: readFileSync(join(CONTRACTS_DIR, name), "utf8") };
  }
  const input = { language: "Solidity", sources, settings: SETTINGS };
  const output = JSON.parse(solc.compile(JSON.stringify(input), { import: findImports }));
  const errors = (output.errors || []).filter((e) => e.severity === "error");
  // OpenZeppelin's own notes (e.g. its transient reentrancy guard) are expected; ours are shown.
  for (const e of output.errors || []) {
    if (e.severity === "error" || !e.sourceLocation?.file.startsWith("@openzeppelin/")) console.error(e.formattedMessage);
  }
  if (errors.length) process.exit(1);

  const ozVersion = JSON.parse(readFileSync(join(NODE_MODULES, "@openzeppelin/contracts/package.json"), "utf8")).version;
  const artifacts = {};
  for (const name of DEPLOYABLE) {
    const sourceName = `contracts/${name}.sol`;
    const out = output.contracts[sourceName][name];
    const metadata = JSON.parse(out.metadata);
    const sourceHashes = {};
    for (const unit of Object.keys(metadata.sources).sort()) sourceHashes[unit] = metadata.sources[unit].keccak256;
    const artifact = {
      contractName: name,
      sourceName,
      compiler: { name: "solc", version: solc.version() },
      openzeppelinContracts: ozVersion,
      settings: { evmVersion: SETTINGS.evmVersion, optimizer: SETTINGS.optimizer, viaIR: SETTINGS.viaIR, metadata: SETTINGS.metadata },
      sources: sourceHashes,
      abi: out.abi,
      bytecode: `0x${out.evm.bytecode.object}`,
      deployedBytecode: `0x${out.evm.deployedBytecode.object}`,
    };
    artifacts[`${name}.json`] = `${JSON.stringify(artifact, null, 2)}\n`;
  }
  return artifacts;
}

const check = process.argv.includes("--check");
const artifacts = compile();
if (check) {
  const stale = Object.entries(artifacts).filter(([file, text]) => {
    const path = join(BUILD_DIR, file);
    return !existsSync(path) || readFileSync(path, "utf8") !== text;
  });
  if (stale.length) {
    console.error(`Committed artifacts differ from a fresh compile: ${stale.map(([f]) => f).join(", ")}`);
    console.error("Run `node scripts/compile-contracts.mjs` and commit contracts/build/.");
    process.exit(1);
  }
  console.log(`contracts/build is up to date (${Object.keys(artifacts).length} artifacts, solc ${solc.version()}).`);
} else {
  mkdirSync(BUILD_DIR, { recursive: true });
  for (const [file, text] of Object.entries(artifacts)) writeFileSync(join(BUILD_DIR, file), text);
  console.log(`Wrote ${Object.keys(artifacts).length} artifacts to contracts/build (solc ${solc.version()}).`);
}

// Drives the real server the way the extension does: spawned over stdio, initialized with the
// capabilities vscode-languageclient advertises for inline completion, completion and progress.
// MTLSP_TEST_SERVER (a JSON array: the command) and MTLSP_TEST_WORKSPACE (a folder holding
// app/report.py) come from tests/test_vscode.py.
import { test } from "node:test";
import * as assert from "node:assert/strict";
import { spawn } from "node:child_process";
import * as fs from "node:fs";
import * as path from "node:path";
import { pathToFileURL } from "node:url";
import { createMessageConnection, StreamMessageReader, StreamMessageWriter } from "vscode-languageserver-protocol/node";
import { inlineContext } from "../src/protocol";
import { serverSettings, Status, statusText } from "../src/settings";

test("settings map to the server's initializationOptions", () => {
  const values: Record<string, unknown> = { maxTokens: 12, languages: { markdown: false } };
  const got = serverSettings((key, fallback) => (key in values ? values[key] : fallback) as typeof fallback);
  assert.deepEqual(got, { device: "auto", maxTokens: 12, memoryCap: 1_000_000, languages: { markdown: false } });
});

test("VS Code's inline-completion context in LSP terms", () => {
  // what VS Code hands the provider for Alt+\ with the popup open: Invoke (0), a vscode.Range
  const range = { start: { line: 4, character: 20 }, end: { line: 4, character: 23 }, toJSON: () => ["not", "lsp"] };
  assert.deepEqual(JSON.parse(JSON.stringify(inlineContext({ triggerKind: 0, selectedCompletionInfo: { range, text: "apply" } }))),
    { triggerKind: 1, selectedCompletionInfo: { range: { start: { line: 4, character: 20 }, end: { line: 4, character: 23 } }, text: "apply" } });
  assert.deepEqual(inlineContext({ triggerKind: 1 }), { triggerKind: 2 });
});

test("status bar text", () => {
  const st: Status = { model: { fingerprint: "0123456789abcdef", parameters: 5753289 }, modelError: null, device: "cpu",
    folders: [{ root: "/w", entries: 198026, files: 169, indexing: { phase: "indexing", filesDone: 3, filesTotal: 9 } }] };
  assert.equal(statusText(st).text, "$(sync~spin) 3/9 mtlsp cpu 198k");
  assert.match(statusText(st).tooltip, /198,026 memory entries in 169 files/);
  assert.equal(statusText({ ...st, model: null, modelError: "bad checksum" }).text, "$(error) mtlsp");
  assert.equal(statusText({ ...st, model: null, modelError: null }).text, "$(sync~spin) mtlsp loading");
  assert.equal(statusText({ ...st, folders: [{ ...st.folders[0], indexing: { phase: "ready", filesDone: 9, filesTotal: 9 } }] }).text,
    "$(database) mtlsp cpu 198k");
});

test("the real server over stdio", { timeout: 120_000 }, async () => {
  const [cmd, ...args] = JSON.parse(process.env.MTLSP_TEST_SERVER ?? "null") as string[];
  const root = process.env.MTLSP_TEST_WORKSPACE as string;
  assert.ok(cmd && root, "MTLSP_TEST_SERVER and MTLSP_TEST_WORKSPACE must be set");
  const proc = spawn(cmd, args, { stdio: ["pipe", "pipe", "inherit"] });
  const conn = createMessageConnection(new StreamMessageReader(proc.stdout), new StreamMessageWriter(proc.stdin));
  const progress: string[] = [];
  conn.onRequest("window/workDoneProgress/create", () => null);
  conn.onRequest("client/registerCapability", () => null);
  conn.onNotification("$/progress", (p: { value: { kind: string } }) => progress.push(p.value.kind));
  conn.onNotification("window/logMessage", () => undefined);
  conn.listen();
  try {
    const init = await conn.sendRequest("initialize", {
      processId: process.pid,
      rootUri: pathToFileURL(root).href,
      workspaceFolders: [{ uri: pathToFileURL(root).href, name: "ws" }],
      initializationOptions: serverSettings((_key, fallback) => fallback),
      capabilities: {
        window: { workDoneProgress: true },
        general: { positionEncodings: ["utf-16"] },
        textDocument: { inlineCompletion: { dynamicRegistration: true }, completion: { completionItem: { snippetSupport: true } } },
        workspace: { didChangeWatchedFiles: { dynamicRegistration: true } },
      },
    }) as { capabilities: Record<string, unknown> };
    assert.ok(init.capabilities.inlineCompletionProvider, "no inline completion provider");
    assert.ok(init.capabilities.completionProvider, "no completion provider");
    await conn.sendNotification("initialized", {});
    let st: Status | undefined;
    for (let i = 0; i < 600; i++) {
      st = await conn.sendRequest<Status>("mtlsp/status", {});
      if (st.folders.length && st.folders[0].indexing.phase === "ready") break;
      await new Promise((r) => setTimeout(r, 100));
    }
    assert.equal(st?.folders[0].indexing.phase, "ready");
    assert.ok((st?.folders[0].entries ?? 0) > 20);
    assert.match(statusText(st as Status).text, /mtlsp cpu/);

    const file = path.join(root, "app", "report.py");
    const text = fs.readFileSync(file, "utf8");
    const uri = pathToFileURL(file).href;
    await conn.sendNotification("textDocument/didOpen", { textDocument: { uri, languageId: "python", version: 1, text } });
    const lines = text.split("\n");
    const line = lines.findIndex((l) => l.includes("pricing.app"));
    const character = lines[line].indexOf("pricing.app") + "pricing.app".length;
    const position = { line, character };
    const popup = await conn.sendRequest<{ items: { label: string; textEdit: { range: unknown } }[] }>(
      "textDocument/completion", { textDocument: { uri }, position });
    assert.ok(popup.items.length > 0);
    for (const item of popup.items) assert.ok(item.label.startsWith("app"), item.label);
    const ghost = await conn.sendRequest<{ items: { insertText: string }[] }>("textDocument/inlineCompletion",
      { textDocument: { uri }, position, context: { triggerKind: 1 } });
    assert.ok(Array.isArray(ghost.items));
    // as the extension sends it for Alt+\ while the popup shows an item
    const range = { start: { line, character: character - 3 }, end: position };
    const invoked = await conn.sendRequest<{ items: unknown[] }>("textDocument/inlineCompletion", { textDocument: { uri }, position,
      context: inlineContext({ triggerKind: 0, selectedCompletionInfo: { range, text: popup.items[0].label } }) });
    assert.ok(Array.isArray(invoked.items));
    const why = await conn.sendRequest<{ kind: string } | null>("mtlsp/explain", { textDocument: { uri } });
    assert.ok(why && ["inline", "completion"].includes(why.kind));
    assert.equal(progress[0], "begin");
    assert.ok(progress.includes("end"));
    await conn.sendRequest("shutdown");
    await conn.sendNotification("exit");
  } finally {
    conn.dispose();
    proc.kill();
  }
});

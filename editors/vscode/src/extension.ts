// The mtlsp extension: starts `mtlsp serve`, lets vscode-languageclient provide ghost text
// (LSP inline completion, a proposed feature) and popup completion, shows the server's state in
// the status bar, and adds restart / explain commands (re-index is the server's own command).
import * as vscode from "vscode";
import { LanguageClient, LanguageClientOptions, ServerOptions } from "vscode-languageclient/node";
import { inlineContext } from "./protocol";
import { serverSettings, Status, statusText } from "./settings";

const LANGUAGES = ["python", "javascript", "javascriptreact", "typescript", "typescriptreact", "go", "rust", "java", "c", "cpp"];

let client: LanguageClient | undefined;
let statusItem: vscode.StatusBarItem;
let timer: NodeJS.Timeout | undefined;

function settings() {
  const config = vscode.workspace.getConfiguration("mtlsp");
  return serverSettings((key, fallback) => config.get(key, fallback));
}

function makeClient(): LanguageClient {
  const [command, ...args] = vscode.workspace.getConfiguration("mtlsp").get<string[]>("serverCommand", ["mtlsp", "serve"]);
  const serverOptions: ServerOptions = { command, args };
  const clientOptions: LanguageClientOptions = {
    documentSelector: LANGUAGES.map((language) => ({ scheme: "file", language })),
    initializationOptions: settings(),
    outputChannelName: "mtlsp",
    middleware: {
      // hand the client an already converted context (see protocol.ts), which it passes on as is
      provideInlineCompletionItems: (document, position, context, token, next) =>
        next(document, position, inlineContext(context) as unknown as vscode.InlineCompletionContext, token),
    },
  };
  const c = new LanguageClient("mtlsp", "mtlsp", serverOptions, clientOptions);
  c.registerProposedFeatures(); // textDocument/inlineCompletion
  return c;
}

async function refreshStatus(): Promise<void> {
  if (!client || !client.isRunning()) {
    statusItem.text = "$(circle-slash) mtlsp";
    return;
  }
  try {
    const shown = statusText(await client.sendRequest<Status>("mtlsp/status", {}));
    statusItem.text = shown.text;
    statusItem.tooltip = shown.tooltip;
  } catch (e) {
    statusItem.text = "$(warning) mtlsp";
    statusItem.tooltip = String(e);
  }
}

interface Explained {
  kind: string;
  completion: string | string[];
  latencyMs: number;
  support: { path: string; line: number; weight: number; uri: string | null }[];
}

async function explain(): Promise<void> {
  const editor = vscode.window.activeTextEditor;
  if (!client || !editor) {
    return;
  }
  const why = await client.sendRequest<Explained | null>("mtlsp/explain", { textDocument: { uri: editor.document.uri.toString() } });
  if (!why) {
    vscode.window.showInformationMessage("mtlsp: no completion shown in this file yet");
    return;
  }
  const picked = await vscode.window.showQuickPick(
    why.support.map((s) => ({ label: `${s.path}:${s.line}`, description: `${(100 * s.weight).toFixed(0)}% of memory attention`, s })),
    { title: `mtlsp ${why.kind} ${JSON.stringify(why.completion)} (${why.latencyMs} ms): supported by` },
  );
  if (picked?.s.uri) {
    const doc = await vscode.workspace.openTextDocument(vscode.Uri.parse(picked.s.uri));
    const line = Math.max(0, picked.s.line - 1);
    await vscode.window.showTextDocument(doc, { selection: new vscode.Range(line, 0, line, 0) });
  }
}

export async function activate(context: vscode.ExtensionContext): Promise<void> {
  statusItem = vscode.window.createStatusBarItem(vscode.StatusBarAlignment.Right, 100);
  statusItem.command = "mtlsp.explain";
  statusItem.show();
  client = makeClient();
  // mtlsp.reindex is not registered here: the server lists it in executeCommandProvider, and
  // vscode-languageclient registers every such command itself (forwarding it as
  // workspace/executeCommand) while the client runs; a second registration makes start() fail.
  context.subscriptions.push(
    statusItem,
    vscode.commands.registerCommand("mtlsp.restart", async () => {
      await client?.stop();
      client = makeClient();
      await client.start();
    }),
    vscode.commands.registerCommand("mtlsp.explain", explain),
    vscode.workspace.onDidChangeConfiguration((e) => {
      if (e.affectsConfiguration("mtlsp")) {
        client?.sendNotification("workspace/didChangeConfiguration", { settings: { mtlsp: settings() } });
      }
    }),
  );
  timer = setInterval(refreshStatus, 2000);
  await client.start();
  await refreshStatus();
}

export async function deactivate(): Promise<void> {
  if (timer) {
    clearInterval(timer);
  }
  await client?.stop();
}

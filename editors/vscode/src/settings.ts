// VS Code settings -> the server's initializationOptions / didChangeConfiguration object.
// Kept free of the `vscode` module so that the Node tests can check it.

export interface ServerSettings {
  device: string;
  maxTokens: number;
  memoryCap: number;
  languages: Record<string, boolean>;
}

export function serverSettings(get: <T>(key: string, fallback: T) => T): ServerSettings {
  return {
    device: get("device", "auto"),
    maxTokens: get("maxTokens", 48),
    memoryCap: get("memoryCap", 1_000_000),
    languages: get("languages", {} as Record<string, boolean>),
  };
}

export interface FolderStatus {
  root: string;
  entries: number;
  files: number;
  indexing: { phase: string; filesDone: number; filesTotal: number };
}

export interface Status {
  model: { fingerprint: string; parameters: number } | null;
  modelError: string | null;
  device: string | null;
  folders: FolderStatus[];
}

/** The status-bar text and tooltip for an `mtlsp/status` answer. */
export function statusText(st: Status): { text: string; tooltip: string } {
  if (!st.model) {
    return st.modelError
      ? { text: "$(error) mtlsp", tooltip: `mtlsp: no model: ${st.modelError}` }
      : { text: "$(sync~spin) mtlsp loading", tooltip: "mtlsp: loading the model" };
  }
  const entries = st.folders.reduce((n, f) => n + f.entries, 0);
  const busy = st.folders.find((f) => f.indexing.phase === "indexing" || f.indexing.phase === "starting");
  const state = busy ? `$(sync~spin) ${busy.indexing.filesDone}/${busy.indexing.filesTotal}` : "$(database)";
  const lines = [`model ${st.model.fingerprint.slice(0, 12)} (${st.model.parameters.toLocaleString("en")} parameters) on ${st.device}`];
  for (const f of st.folders) {
    lines.push(`${f.root}: ${f.entries.toLocaleString("en")} memory entries in ${f.files} files, indexing ${f.indexing.phase}`);
  }
  return { text: `${state} mtlsp ${st.device} ${compact(entries)}`, tooltip: lines.join("\n") };
}

function compact(n: number): string {
  return n >= 1e6 ? `${(n / 1e6).toFixed(1)}M` : n >= 1e3 ? `${Math.round(n / 1e3)}k` : `${n}`;
}

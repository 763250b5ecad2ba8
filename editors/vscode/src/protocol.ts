// VS Code's inline-completion context -> LSP's InlineCompletionContext. vscode-languageclient
// 9.0.1 passes VS Code's object through unconverted: its trigger kinds are numbered from 0
// (Invoke 0, Automatic 1; LSP has Invoked 1, Automatic 2), and the range of the popup's selected
// item serialises as an array [start, end]. The server then rejects every Alt+\ request and every
// request made while the popup is open. (vscode-languageclient 10 converts it itself.)
// Kept free of the `vscode` module so that the Node tests can check it.

interface Position { line: number; character: number }

export interface CodeInlineContext {
  triggerKind: number;
  selectedCompletionInfo?: { range: { start: Position; end: Position }; text: string };
}

export interface ProtocolInlineContext {
  triggerKind: 1 | 2;
  selectedCompletionInfo?: { range: { start: Position; end: Position }; text: string };
}

const CODE_INVOKE = 0; // vscode.InlineCompletionTriggerKind.Invoke

export function inlineContext(context: CodeInlineContext): ProtocolInlineContext {
  const out: ProtocolInlineContext = { triggerKind: context.triggerKind === CODE_INVOKE ? 1 : 2 };
  const info = context.selectedCompletionInfo;
  if (info) {
    const { start, end } = info.range;
    out.selectedCompletionInfo = {
      range: { start: { line: start.line, character: start.character }, end: { line: end.line, character: end.character } },
      text: info.text,
    };
  }
  return out;
}

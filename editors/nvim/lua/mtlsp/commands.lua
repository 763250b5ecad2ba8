-- :MtlspStatus, :MtlspReindex and :MtlspExplain.
local M = {}

local function client_or_warn()
  local client = require("mtlsp").client(0) or vim.lsp.get_clients({ name = "mtlsp" })[1]
  if not client then
    vim.notify("mtlsp: no server attached (see :checkhealth mtlsp)", vim.log.levels.WARN)
  end
  return client
end

local function sync(client, method, params)
  local resp
  if vim.fn.has("nvim-0.11") == 1 then
    resp = client:request_sync(method, params, 10000, 0)
  else
    resp = client.request_sync(method, params, 10000, 0)
  end
  if not resp or resp.err then
    vim.notify("mtlsp: " .. method .. " failed: " .. vim.inspect(resp and resp.err), vim.log.levels.ERROR)
    return nil
  end
  return resp.result
end

--- Lines describing the server: model, device, memory per folder, indexing.
function M.status_lines(st)
  local lines = {}
  if st.model == vim.NIL or not st.model then
    lines[#lines + 1] = "model: not loaded: " .. tostring(st.modelError)
  else
    lines[#lines + 1] = string.format("model %s (%d parameters) on %s", st.model.fingerprint:sub(1, 12),
      st.model.parameters, st.device)
  end
  for _, f in ipairs(st.folders or {}) do
    local ix = f.indexing
    lines[#lines + 1] = string.format("%s: %d entries in %d files (%s, %s); indexing %s %d/%d files",
      f.root, f.entries, f.files, f.backend, f.watching, ix.phase, ix.filesDone, ix.filesTotal)
  end
  return lines
end

function M.create()
  vim.api.nvim_create_user_command("MtlspStatus", function()
    local client = client_or_warn()
    local st = client and sync(client, "mtlsp/status", vim.empty_dict())
    if st then print(table.concat(M.status_lines(st), "\n")) end
  end, { desc = "mtlsp: model, device, memory and indexing state" })

  vim.api.nvim_create_user_command("MtlspReindex", function()
    local client = client_or_warn()
    local done = client and sync(client, "workspace/executeCommand", { command = "mtlsp.reindex", arguments = {} })
    if done then print("mtlsp: re-indexing " .. table.concat(done.folders, ", ")) end
  end, { desc = "mtlsp: index the workspace folders again" })

  vim.api.nvim_create_user_command("MtlspExplain", function()
    local client = client_or_warn()
    local why = client and sync(client, "mtlsp/explain", { textDocument = vim.lsp.util.make_text_document_params(0) })
    if not why or why == vim.NIL then
      print("mtlsp: no completion shown in this buffer yet")
      return
    end
    local items = {}
    for _, s in ipairs(why.support) do
      items[#items + 1] = { filename = vim.uri_to_fname(s.uri), lnum = s.line,
        text = string.format("%.0f%% of memory attention", 100 * s.weight) }
    end
    vim.fn.setqflist({}, " ", { title = "mtlsp: what supported " .. vim.inspect(why.completion), items = items })
    print(string.format("mtlsp: %s completion %s (%.0f ms), supported by %d memory locations (:copen)",
      why.kind, vim.inspect(why.completion), why.latencyMs, #items))
  end, { desc = "mtlsp: provenance of the last completion, in the quickfix list" })
end

return M

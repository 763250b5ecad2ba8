-- Drives the mtlsp Neovim plugin against a real server, headless.  Run by tests/test_nvim.py:
--   nvim --headless -u NONE -i NONE --cmd "set rtp^=editors/nvim" -l tests/nvim/drive.lua ARGS.json
-- ARGS.json: { cmd = [...], file = path, anchor = text, out = path, attach_ms = optional }.  Writes what it saw to
-- ``out`` as JSON; every step records an error message instead of stopping the run.
local args = vim.json.decode(io.open(_G.arg[1]):read("a"))
local seen = { errors = {} }
local function fail(msg) table.insert(seen.errors, msg) end

vim.cmd("filetype on")
vim.o.virtualedit = "onemore" -- the cursor may sit after the last character, as in insert mode
local mtlsp = require("mtlsp")
local progress_events = 0
vim.api.nvim_create_autocmd("LspProgress", { callback = function() progress_events = progress_events + 1 end })
mtlsp.setup({ cmd = args.cmd, settings = { debounceMs = 50 }, ghost = { debounce_ms = 20 } })

vim.cmd.edit(args.file)
local buf = vim.api.nvim_get_current_buf()
seen.attached = vim.wait(args.attach_ms or 60000, function() return mtlsp.client(buf) ~= nil end, 50)
local function indexed()
  for _, v in pairs(mtlsp.progress) do
    if v.kind == "end" then return true end
  end
  return false
end
seen.progress_end = seen.attached and vim.wait(60000, indexed, 50)
seen.progress_events = progress_events

-- popup completion at the end of the anchor
local lines = vim.api.nvim_buf_get_lines(buf, 0, -1, false)
for i, line in ipairs(lines) do
  local s, e = line:find(args.anchor, 1, true)
  if s then
    vim.api.nvim_win_set_cursor(0, { i, e })
    break
  end
end
local client = mtlsp.client(buf)
if client then
  local params = vim.lsp.util.make_position_params(0, client.offset_encoding)
  local resp = vim.lsp.buf_request_sync(buf, "textDocument/completion", params, 20000)
  local items = {}
  for _, r in pairs(resp or {}) do
    for _, item in ipairs((r.result or {}).items or {}) do items[#items + 1] = item.label end
  end
  seen.popup = items
else
  fail("no client attached")
end

-- ghost text at the end of the anchor (what the insert-mode debounce timer asks for), rendered
-- as virtual text, then inserted by the function the accept key is mapped to
local row = vim.api.nvim_win_get_cursor(0)[1]
seen.line_before = vim.api.nvim_buf_get_lines(buf, row - 1, row, false)[1]
local ghost = require("mtlsp.ghost")
if client then ghost.request(client, buf) end
seen.ghost_shown = vim.wait(30000, function() return ghost.shown(buf) ~= nil end, 20) and ghost.shown(buf) or nil
local marks = vim.api.nvim_buf_get_extmarks(buf, vim.api.nvim_create_namespace("mtlsp_ghost"), 0, -1, { details = true })
seen.extmarks = #marks
if #marks > 0 then
  local chunks = marks[1][4].virt_text or {}
  seen.virt_text = chunks[1] and chunks[1][1] or nil
end
seen.accept_mapped = false
for _, map in ipairs(vim.api.nvim_buf_get_keymap(buf, "i")) do
  if map.lhs == "<C-L>" and map.desc == "mtlsp: accept ghost text" then seen.accept_mapped = true end
end
seen.accepted = ghost.accept(buf)
seen.line_after = vim.api.nvim_buf_get_lines(buf, row - 1, row, false)[1]
seen.extmarks_after = #vim.api.nvim_buf_get_extmarks(buf, vim.api.nvim_create_namespace("mtlsp_ghost"), 0, -1, {})

-- commands
local ok, out = pcall(vim.api.nvim_exec2, "MtlspStatus", { output = true })
seen.status = ok and out.output or ("error: " .. tostring(out))
ok, out = pcall(vim.api.nvim_exec2, "MtlspExplain", { output = true })
seen.explain = ok and out.output or ("error: " .. tostring(out))
seen.quickfix = #vim.fn.getqflist()
ok, out = pcall(vim.api.nvim_exec2, "MtlspReindex", { output = true })
seen.reindex = ok and out.output or ("error: " .. tostring(out))

-- :checkhealth mtlsp
ok, out = pcall(vim.cmd, "checkhealth mtlsp")
if ok then
  seen.health = table.concat(vim.api.nvim_buf_get_lines(0, 0, -1, false), "\n")
else
  fail("checkhealth: " .. tostring(out))
end

local f = io.open(args.out, "w")
f:write(vim.json.encode(seen))
f:close()
for _, c in ipairs(vim.lsp.get_clients()) do c:stop() end
vim.wait(5000, function() return #vim.lsp.get_clients() == 0 end, 50)
vim.cmd("qa!")

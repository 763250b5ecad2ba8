-- Ghost text for Neovims without vim.lsp.inline_completion (before 0.12): asks the server for
-- textDocument/inlineCompletion while typing (debounced, the stale request cancelled), shows the
-- first item as virtual text at the cursor, and inserts it on the accept key.
local M = {}

local ns = vim.api.nvim_create_namespace("mtlsp_ghost")
local method_calls = vim.fn.has("nvim-0.11") == 1 -- 0.11 made client.request a method

local function request(client, ...)
  if method_calls then return client:request(...) end
  return client.request(...)
end

local function cancel(client, id)
  if method_calls then return client:cancel_request(id) end
  return client.cancel_request(id)
end
local state = {} -- bufnr -> { timer, request = {client, id}, shown = {row, col, text} }

local function clear(bufnr)
  local s = state[bufnr]
  if not s then return end
  vim.api.nvim_buf_clear_namespace(bufnr, ns, 0, -1)
  s.shown = nil
  if s.request then
    cancel(s.request.client, s.request.id)
    s.request = nil
  end
end

local function show(bufnr, row, col, text)
  local lines = vim.split(text, "\n", { plain = true })
  local virt_lines = {}
  for i = 2, #lines do
    virt_lines[#virt_lines + 1] = { { lines[i], "Comment" } }
  end
  vim.api.nvim_buf_set_extmark(bufnr, ns, row, col, {
    virt_text = { { lines[1], "Comment" } },
    virt_text_pos = "inline",
    virt_lines = #virt_lines > 0 and virt_lines or nil,
    hl_mode = "combine",
  })
  state[bufnr].shown = { row = row, col = col, text = text }
end

--- Ask for a completion at the cursor of the current window now.
function M.request(client, bufnr)
  clear(bufnr)
  if vim.api.nvim_get_current_buf() ~= bufnr then
    return
  end
  local params = vim.lsp.util.make_position_params(0, client.offset_encoding)
  params.context = { triggerKind = 2 } -- Automatic
  local cursor = vim.api.nvim_win_get_cursor(0)
  local ok, id = request(client, "textDocument/inlineCompletion", params, function(err, result)
    local s = state[bufnr]
    if s then s.request = nil end
    if err or not result then return end
    local items = result.items or result
    local item = items[1]
    local now = vim.api.nvim_win_get_cursor(0)
    if not item or not item.insertText or item.insertText == "" or now[1] ~= cursor[1] or now[2] ~= cursor[2] then
      return -- nothing, or the cursor moved meanwhile
    end
    local text = type(item.insertText) == "table" and item.insertText.value or item.insertText
    show(bufnr, cursor[1] - 1, cursor[2], text)
  end, bufnr)
  if ok then
    state[bufnr].request = { client = client, id = id }
  end
end

--- Insert the shown ghost text at the cursor; returns false when none is shown.
function M.accept(bufnr)
  local s = state[bufnr]
  if not s or not s.shown then return false end
  local shown = s.shown
  clear(bufnr)
  local lines = vim.split(shown.text, "\n", { plain = true })
  vim.api.nvim_buf_set_text(bufnr, shown.row, shown.col, shown.row, shown.col, lines)
  local last_row = shown.row + #lines - 1
  local last_col = (#lines == 1 and shown.col or 0) + #lines[#lines]
  vim.api.nvim_win_set_cursor(0, { last_row + 1, last_col })
  return true
end

--- The text shown at the cursor now, or nil (for tests and statuslines).
function M.shown(bufnr)
  local s = state[bufnr or vim.api.nvim_get_current_buf()]
  return s and s.shown and s.shown.text or nil
end

function M.attach(client, bufnr, opts)
  if state[bufnr] then return end
  state[bufnr] = { timer = vim.uv.new_timer() }
  local group = vim.api.nvim_create_augroup("mtlsp_ghost_" .. bufnr, { clear = true })
  vim.api.nvim_create_autocmd({ "TextChangedI", "TextChangedP", "InsertEnter", "CursorMovedI" }, {
    group = group, buffer = bufnr,
    callback = function()
      clear(bufnr)
      local s = state[bufnr]
      s.timer:stop()
      s.timer:start(opts.debounce_ms, 0, vim.schedule_wrap(function()
        if vim.api.nvim_get_mode().mode:match("^i") then -- still typing
          M.request(client, bufnr)
        end
      end))
    end,
  })
  vim.api.nvim_create_autocmd({ "InsertLeave", "BufLeave" }, {
    group = group, buffer = bufnr, callback = function() clear(bufnr) end,
  })
  vim.api.nvim_create_autocmd("BufWipeout", {
    group = group, buffer = bufnr,
    callback = function()
      clear(bufnr)
      state[bufnr].timer:close()
      state[bufnr] = nil
    end,
  })
  local key = vim.api.nvim_replace_termcodes(opts.accept, true, false, true)
  vim.keymap.set("i", opts.accept, function()
    if not M.accept(bufnr) then -- nothing shown: the key does what it did before
      vim.api.nvim_feedkeys(key, "n", false)
    end
  end, { buffer = bufnr, desc = "mtlsp: accept ghost text" })
  vim.keymap.set("i", opts.dismiss, function() clear(bufnr) end, { buffer = bufnr, desc = "mtlsp: dismiss ghost text" })
end

return M

-- mtlsp for Neovim: starts `mtlsp serve` for code buffers, popup completion through
-- vim.lsp.completion (0.11+), ghost text through vim.lsp.inline_completion where Neovim has it
-- (0.12+) or through this plugin's own rendering (ghost.lua), and :Mtlsp* commands.
local M = {}

M.defaults = {
  cmd = { "mtlsp", "serve" },
  filetypes = { "python", "javascript", "javascriptreact", "typescript", "typescriptreact", "go", "rust",
                "java", "c", "cpp" },
  root_markers = { ".git", "pyproject.toml", "setup.py", "package.json", "go.mod", "Cargo.toml", ".hg" },
  settings = {}, -- sent as initializationOptions: maxTokens, device, memoryCap, languages, ...
  completion = { autotrigger = true },
  ghost = { enabled = true, accept = "<C-l>", dismiss = "<C-]>", debounce_ms = 120 },
}

M.config = vim.deepcopy(M.defaults)
M.progress = {} -- token -> last $/progress value, for :MtlspStatus and tests

local function on_attach(client, bufnr)
  if M.config.completion and vim.lsp.completion then
    vim.lsp.completion.enable(true, client.id, bufnr, { autotrigger = M.config.completion.autotrigger })
  end
  if M.config.ghost.enabled then
    if vim.lsp.inline_completion then
      vim.lsp.inline_completion.enable(true, { bufnr = bufnr })
      vim.keymap.set("i", M.config.ghost.accept, function()
        if not vim.lsp.inline_completion.get() then
          return M.config.ghost.accept
        end
      end, { buffer = bufnr, expr = true, desc = "mtlsp: accept ghost text" })
    else
      require("mtlsp.ghost").attach(client, bufnr, M.config.ghost)
    end
  end
end

--- Configure and enable the server.  ``opts`` extends ``M.defaults``.
function M.setup(opts)
  M.config = vim.tbl_deep_extend("force", vim.deepcopy(M.defaults), opts or {})
  local c = M.config
  local server = {
    cmd = c.cmd,
    filetypes = c.filetypes,
    root_markers = c.root_markers,
    init_options = c.settings,
    settings = { mtlsp = c.settings },
    on_attach = on_attach,
    handlers = {
      ["$/progress"] = function(err, result, ctx)
        M.progress[result.token] = result.value
        return vim.lsp.handlers["$/progress"](err, result, ctx)
      end,
    },
  }
  if vim.lsp.config and vim.lsp.enable then -- Neovim 0.11+
    vim.lsp.config("mtlsp", server)
    vim.lsp.enable("mtlsp")
  else -- Neovim 0.10: start per buffer with our own root detection
    vim.api.nvim_create_autocmd("FileType", {
      group = vim.api.nvim_create_augroup("mtlsp", { clear = true }),
      pattern = c.filetypes,
      callback = function(ev)
        local cfg = vim.tbl_extend("force", server, { name = "mtlsp",
          root_dir = vim.fs.root(ev.buf, c.root_markers) or vim.fn.getcwd() })
        vim.lsp.start(cfg, { bufnr = ev.buf })
      end,
    })
  end
  require("mtlsp.commands").create()
end

--- The mtlsp client attached to ``bufnr`` (default: current buffer), or nil.
function M.client(bufnr)
  return vim.lsp.get_clients({ name = "mtlsp", bufnr = bufnr or 0 })[1]
end

return M

-- :checkhealth mtlsp
local M = {}

function M.check()
  local health = vim.health
  health.start("mtlsp")
  if vim.fn.has("nvim-0.10") == 1 then
    health.ok("Neovim " .. tostring(vim.version()))
  else
    health.error("Neovim 0.10 or newer is needed (vim.lsp.start with root detection)")
  end
  if vim.lsp.completion then
    health.ok("popup completion: vim.lsp.completion")
  else
    health.warn("vim.lsp.completion needs Neovim 0.11: popup completion is off")
  end
  if vim.lsp.inline_completion then
    health.ok("ghost text: vim.lsp.inline_completion")
  else
    health.ok("ghost text: mtlsp's own virtual text (Neovim before 0.12)")
  end
  local config = require("mtlsp").config
  local exe = config.cmd[1]
  if vim.fn.executable(exe) == 1 then
    health.ok("server command: " .. table.concat(config.cmd, " "))
    local probe = vim.system(vim.list_extend(vim.deepcopy(config.cmd), { "--help" }), { text = true }):wait(60000)
    if probe.code == 0 then
      health.ok("`" .. table.concat(config.cmd, " ") .. " --help` runs")
    else
      health.error("`" .. table.concat(config.cmd, " ") .. " --help` failed: " .. (probe.stderr or ""),
        { "install mtlsp: pip install mtlsp (see its README)", "or set cmd in require('mtlsp').setup{}" })
    end
  else
    health.error("server command not found: " .. exe, { "pip install mtlsp, or set cmd in require('mtlsp').setup{}" })
  end
  local clients = vim.lsp.get_clients({ name = "mtlsp" })
  if #clients == 0 then
    health.info("no mtlsp server running yet (it starts with the first buffer of a supported filetype)")
    return
  end
  for _, client in ipairs(clients) do
    local resp
    if vim.fn.has("nvim-0.11") == 1 then
      resp = client:request_sync("mtlsp/status", vim.empty_dict(), 10000, 0)
    else
      resp = client.request_sync("mtlsp/status", vim.empty_dict(), 10000, 0)
    end
    if not resp or resp.err then
      health.error("mtlsp/status failed: " .. vim.inspect(resp and resp.err))
    elseif resp.result.modelError ~= vim.NIL and resp.result.modelError then
      health.error("the server has no model: " .. resp.result.modelError)
    else
      for _, line in ipairs(require("mtlsp.commands").status_lines(resp.result)) do
        health.ok(line)
      end
    end
  end
end

return M

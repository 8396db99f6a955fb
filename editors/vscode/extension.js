// Starts `nemoc lsp` (stdio) for .nemo files: diagnostics as you type, hover docs, completion.
// The command comes from the `nemo.server.command` setting (default ["nemoc", "lsp"]).
"use strict";

const vscode = require("vscode");
const { LanguageClient, TransportKind } = require("vscode-languageclient/node");

let client;

function activate(context) {
  const command = vscode.workspace.getConfiguration("nemo").get("server.command", ["nemoc", "lsp"]);
  if (!Array.isArray(command) || command.length === 0) {
    return; // highlighting only
  }
  const serverOptions = { command: command[0], args: command.slice(1), transport: TransportKind.stdio };
  const clientOptions = {
    documentSelector: [{ scheme: "file", language: "nemo" }],
    synchronize: { fileEvents: vscode.workspace.createFileSystemWatcher("**/*.nemo") },
  };
  client = new LanguageClient("nemo", "nemoc language server", serverOptions, clientOptions);
  context.subscriptions.push({ dispose: () => client && client.stop() });
  return client.start();
}

function deactivate() {
  return client ? client.stop() : undefined;
}

module.exports = { activate, deactivate };

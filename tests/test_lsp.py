"""`nemoc lsp` driven as an editor drives it: a real subprocess, JSON-RPC with Content-Length framing on stdio."""

from __future__ import annotations

import json
import queue
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st

pytest.importorskip("pygls")
pytest.importorskip("lsprotocol")

from nemoc.runtime.cli import cli  # noqa: E402

TIMEOUT = 60  # seconds to wait for one answer; generous on a loaded machine, never a speed claim

BROKEN = """\
experiment t {
  cluster { gpu = H100  nodes = 1 }
  model llama3_8b { seq_length = 4096 }
  parallel { tensor = 3 }
  data web { path = "web.jsonl" }
  stage pretrain {
    data = [web]  steps = 10
    optimizer = adam(lr = 3e-4, weight_decay = 0.1)
    global_btch = 8
  }
}
"""


class Client:
    """A minimal LSP client: framed JSON-RPC over the server's stdin/stdout, answers read on a thread."""

    def __init__(self, cwd: Path):
        self.proc = subprocess.Popen([sys.executable, "-m", "nemoc.runtime.cli", "lsp"], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=cwd)
        self.messages: queue.Queue = queue.Queue()
        self.next_id = 0
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        stream = self.proc.stdout
        while True:
            headers = {}
            while True:
                line = stream.readline()
                if not line:
                    return
                line = line.decode("ascii").strip()
                if not line:
                    break
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
            body = stream.read(int(headers["content-length"]))
            self.messages.put(json.loads(body))

    def send(self, payload: dict) -> None:
        body = json.dumps(payload).encode()
        self.proc.stdin.write(b"Content-Length: %d\r\n\r\n" % len(body) + body)
        self.proc.stdin.flush()

    def notify(self, method: str, params: dict) -> None:
        self.send({"jsonrpc": "2.0", "method": method, "params": params})

    def request(self, method: str, params: dict) -> dict:
        self.next_id += 1
        self.send({"jsonrpc": "2.0", "id": self.next_id, "method": method, "params": params})
        message = self.wait(lambda m: m.get("id") == self.next_id and "method" not in m)
        assert "error" not in message, message
        return message["result"]

    def wait(self, predicate) -> dict:
        while True:
            try:
                message = self.messages.get(timeout=TIMEOUT)
            except queue.Empty:
                raise AssertionError(f"no answer from nemoc lsp; stderr: {self._stderr()}") from None
            if predicate(message):
                return message

    def diagnostics(self, uri: str) -> list[dict]:
        return self.wait(lambda m: m.get("method") == "textDocument/publishDiagnostics"
                         and m["params"]["uri"] == uri)["params"]["diagnostics"]

    def _stderr(self) -> str:
        if self.proc.poll() is None:
            return "(still running)"
        return self.proc.stderr.read().decode(errors="replace")[-2000:]

    def close(self) -> int:
        if self.proc.poll() is None:
            self.request("shutdown", None)
            self.notify("exit", None)
        try:
            return self.proc.wait(timeout=TIMEOUT)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture
def server(tmp_path):
    client = Client(tmp_path)
    client.request("initialize", {"processId": None, "rootUri": tmp_path.as_uri(), "capabilities": {}})
    client.notify("initialized", {})
    yield client
    client.close()


def _open(server, path: Path, text: str) -> str:
    path.write_text(text)
    uri = path.as_uri()
    server.notify("textDocument/didOpen", {"textDocument": {"uri": uri, "languageId": "nemo", "version": 1,
                                                            "text": text}})
    return uri


def _at(text: str, marker: str, delta: int = 0) -> dict:
    offset = text.index(marker) + delta
    line = text.count("\n", 0, offset)
    return {"line": line, "character": offset - (text.rfind("\n", 0, offset) + 1)}


def test_diagnostics_as_you_type_have_the_codes_and_spans_of_nemoc_check(server, tmp_path):
    path = tmp_path / "t.nemo"
    uri = _open(server, path, BROKEN)
    published = server.diagnostics(uri)
    checked = json.loads(CliRunner().invoke(cli, ["check", str(path), "--json"]).stdout)["files"][0]["diagnostics"]
    assert checked, "the broken file must have diagnostics"

    def key(code, line, col, end_line, end_col):
        return code, line, col, end_line, end_col

    lsp_keys = sorted(key(d["code"], d["range"]["start"]["line"] + 1, d["range"]["start"]["character"] + 1,
                          d["range"]["end"]["line"] + 1, d["range"]["end"]["character"] + 1) for d in published)
    check_keys = sorted(key(d["code"], d["span"]["line"], d["span"]["col"], d["span"]["end_line"], d["span"]["end_col"])
                        for d in checked)
    assert lsp_keys == check_keys
    unknown = next(d for d in published if d["code"] == "E021")
    assert "global_btch" in unknown["message"] and "did you mean `global_batch`" in unknown["message"]
    assert unknown["severity"] == 1 and unknown["source"] == "nemoc"

    # as you type: the unsaved buffer is checked, not the file on disk
    fixed = BROKEN.replace("    global_btch = 8\n", "")
    server.notify("textDocument/didChange", {"textDocument": {"uri": uri, "version": 2},
                                             "contentChanges": [{"text": fixed}]})
    assert {"E101", "E102"} <= {d["code"] for d in server.diagnostics(uri)}  # tp 3: the layout rules remain
    server.notify("textDocument/didChange", {"textDocument": {"uri": uri, "version": 3},
                                             "contentChanges": [{"text": fixed.replace("tensor = 3", "tensor = 2")}]})
    assert server.diagnostics(uri) == []
    broken_syntax = fixed.replace("steps = 10", "steps = ")
    server.notify("textDocument/didChange", {"textDocument": {"uri": uri, "version": 4},
                                             "contentChanges": [{"text": broken_syntax}]})
    (syntax,) = server.diagnostics(uri)
    assert syntax["code"].startswith("E01")


def test_hover_shows_the_schema_docs(server, tmp_path):
    uri = _open(server, tmp_path / "t.nemo", BROKEN)
    server.diagnostics(uri)

    def hover(marker, delta=1):
        result = server.request("textDocument/hover", {"textDocument": {"uri": uri}, "position": _at(BROKEN, marker, delta)})
        return result["contents"]["value"] if result else None

    assert "Peak learning rate" in hover("lr = 3e-4") and "default `0.0003`" in hover("lr = 3e-4")
    assert "Tensor-parallel" in hover("tensor = 3") or "TP" in hover("tensor = 3")
    assert "Optimizer steps" in hover("steps = 10")
    assert "model preset `llama3_8b`" in hover("llama3_8b") and "32 layers" in hover("llama3_8b")
    assert "`stage` block" in hover("stage pretrain")
    assert "`weight_decay`" in hover("adam(")
    assert hover("web.jsonl", 2) is None  # inside a string: nothing to say


def test_completion_offers_fields_presets_arguments_and_stage_names(server, tmp_path):
    text = ('experiment t {\n  parallel { te }\n  model  { }\n  data web { path = "w" }\n'
            '  stage pretrain { data = [] optimizer = adam() precision = }\n  stage sft after  { kind = sft }\n}\n')
    uri = _open(server, tmp_path / "c.nemo", text)
    server.diagnostics(uri)

    def labels(marker, delta=0):
        result = server.request("textDocument/completion", {"textDocument": {"uri": uri},
                                                             "position": _at(text, marker, len(marker) + delta)})
        return [item["label"] for item in result["items"]]

    assert {"tensor", "pipeline", "micro_batch", "recompute"} <= set(labels("parallel { te"))
    assert "optimizer" not in labels("parallel { te")
    assert {"llama3_8b", "llama3_70b", "mixtral_8x7b"} <= set(labels("model "))
    assert labels("adam(") == ["lr", "betas", "eps", "weight_decay", "grad_clip"]
    assert labels("data = [") == ["web"]
    assert labels("stage sft after ") == ["pretrain"]  # not itself
    assert {"pack", "template", "optimizer", "checkpoint", "parallel"} <= set(labels("kind = sft", 1))
    assert "beta" not in labels("kind = sft", 1)  # a dpo field, not an sft one


def test_the_server_shuts_down_cleanly(tmp_path):
    client = Client(tmp_path)
    client.request("initialize", {"processId": None, "rootUri": None, "capabilities": {}})
    client.notify("initialized", {})
    assert client.close() == 0


_PIECES = list('{}[](),=" \n#ab_-.09%') + ["stage ", "model ", "after ", "adam(", "data = [", "kind = dpo ",
                                           "parallel {", "lr = ", "tensor = ", "x(", "experiment e {"]


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from(_PIECES), max_size=40).map("".join), st.floats(0, 1), st.integers(0, 50))
def test_hover_and_completion_never_fail_on_any_text(text, where, line):
    from nemoc.runtime.cli.lsp import complete, hover, offset_of

    offset = round(where * len(text))
    complete(text, offset)
    hover(text, offset)
    assert 0 <= offset_of(text, line, line) <= len(text)

"""Every `--json` output validates against its published JSON Schema (runtime/schemas/*.json), on the
real output of every example; and each schema can fail (a broken document is rejected)."""

from __future__ import annotations

import copy
import json
import shutil
from importlib import resources
from pathlib import Path

import jsonschema
import pytest
from click.testing import CliRunner
from referencing import Registry, Resource

from nemoc.runtime.cli import cli

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = sorted((REPO / "examples").glob("*.nemo"))
INTEROP = sorted(p for p in (REPO / "tests" / "data" / "interop").iterdir() if p.suffix in (".sh", ".yaml"))
SCHEMA_DIR = resources.files("nemoc.runtime") / "schemas"
SCHEMAS = {p.name.removesuffix(".schema.json"): json.loads(p.read_text()) for p in SCHEMA_DIR.iterdir()
           if p.name.endswith(".schema.json")}
REGISTRY = Registry().with_resources((s["$id"], Resource.from_contents(s)) for s in SCHEMAS.values())


def validate(name: str, document) -> None:
    jsonschema.Draft202012Validator(SCHEMAS[name], registry=REGISTRY).validate(document)


def invoke_json(*args, code: int = 0):
    result = CliRunner().invoke(cli, list(args))
    assert result.exit_code == code, result.output
    return json.loads(result.stdout)


def test_the_schemas_are_valid_and_packaged():
    assert {"plan", "graph", "status", "check", "diagnostics", "diagnostic", "run", "error", "presets", "import",
            "export"} <= set(SCHEMAS)
    for schema in SCHEMAS.values():
        jsonschema.Draft202012Validator.check_schema(schema)
    pyproject = (REPO / "pyproject.toml").read_text()
    assert '"schemas/*.json"' in pyproject  # shipped as package data of nemoc.runtime


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_plan_graph_check_export_of_every_example(path):
    plan = invoke_json("plan", str(path), "--json")
    validate("plan", plan)
    validate("graph", invoke_json("graph", str(path), "--json"))
    validate("check", invoke_json("check", str(path), "--json"))
    validate("export", invoke_json("export", "--megatron-args", str(path), "--json"))
    broken = copy.deepcopy(plan)
    broken["stages"][0]["layout"]["tp"] = 0
    with pytest.raises(jsonschema.ValidationError):
        validate("plan", broken)


def test_diagnostics_and_errors(tmp_path):
    bad = tmp_path / "bad.nemo"
    bad.write_text("experiment x {\n  cluster { gpu = H100 }\n  model llama3_8b {}\n  parallel { tensor = 3 }\n"
                   "  stage pretrain { steps = 10  global_batch = 8 }\n}\n")
    diags = invoke_json("plan", str(bad), "--json", code=1)
    validate("diagnostics", diags)
    assert diags["diagnostics"] and any(d["severity"] == "error" for d in diags["diagnostics"])
    check = invoke_json("check", str(bad), str(tmp_path / "missing.nemo"), "--json", code=2)
    validate("check", check)
    validate("error", invoke_json("status", str(tmp_path), "--json", code=2))
    validate("error", invoke_json("import", str(tmp_path / "missing.sh"), "--json", code=2))
    (tmp_path / "echo.sh").write_text("echo no launch here\n")
    validate("error", invoke_json("import", str(tmp_path / "echo.sh"), "--json", code=1))
    validate("error", invoke_json("export", "--megatron-args", str(REPO / "examples" / "quickstart.nemo"),
                                  "--stage", "nope", "--json", code=2))
    with pytest.raises(jsonschema.ValidationError):
        validate("diagnostics", {"diagnostics": [{"code": "X1", "severity": "error", "message": "m"}]})


def test_presets_and_import():
    validate("presets", invoke_json("presets", "--json"))
    for path in INTEROP:
        validate("import", invoke_json("import", str(path), "--json"))


def test_run_and_status(tmp_path):
    shutil.copy(REPO / "examples" / "quickstart.nemo", tmp_path / "quickstart.nemo")
    (tmp_path / "data" / "quickstart").mkdir(parents=True)
    corpus = tmp_path / "data" / "quickstart" / "corpus.jsonl"
    corpus.write_text('{"txt": "a record without the text field: the tokenizer task fails at once"}\n')
    dry = invoke_json("run", str(tmp_path / "quickstart.nemo"), "--dry-run", "--workdir", str(tmp_path / "d"), "--json")
    validate("run", dry)
    failed = invoke_json("run", str(tmp_path / "quickstart.nemo"), "--workdir", str(tmp_path / "w"), "--json", code=1)
    validate("run", failed)
    assert not failed["ok"]
    status = invoke_json("status", str(tmp_path / "w"), "--json")
    validate("status", status)
    assert [t["state"] for t in status["tasks"]][0] == "failed"

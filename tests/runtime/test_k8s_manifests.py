"""PyTorchJob manifests: structure, validation against the kubeflow-training SDK's published models,
`write_manifests` for a whole graph (--dry-run), and `launch` through a recording stand-in kubectl."""

from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path
from types import MappingProxyType

import pytest
import yaml

from nemoc.runtime.orchestrate.launch_k8s import (
    K8sError,
    K8sLauncher,
    K8sOptions,
    job_name,
    manifest_for_spec,
    pytorchjob,
    to_yaml,
    validate,
    write_manifests,
)
from nemoc.runtime.orchestrate.launchers import LaunchSpec



def check(manifest: dict) -> list[str]:
    """The schema's verdict; skips (rather than passes) where the package that ships it is missing."""
    pytest.importorskip("kubeflow.training", reason="the PyTorchJob schema ships in the kubeflow-training package")
    return validate(manifest)

OPTS = K8sOptions(namespace="ml", image="nvcr.io/nvidia/pytorch:25.01-py3", queue="team-a",
                  data_pvc="datasets", checkpoint_pvc="runs", max_restarts=5, backoff_limit=4)


def gpu_job(**kw) -> dict:
    args = dict(name="nemoc-exp-train-pretrain-abcd1234", task_id="train:pretrain", module="nemoc.runtime.train",
                args=("/runs/exp/tasks/train_pretrain/task.json",), nodes=4, procs_per_node=8, gpus_per_node=8,
                run_root="/runs/exp", data_root="/data", opts=OPTS)
    args.update(kw)
    return pytorchjob(**args)


def worker(manifest: dict) -> dict:
    return manifest["spec"]["pytorchReplicaSpecs"]["Worker"]


def test_gpu_job_has_resources_rendezvous_volumes_and_restart_policy():
    m = gpu_job()
    assert (m["apiVersion"], m["kind"]) == ("kubeflow.org/v1", "PyTorchJob")
    assert check(m) == []
    w = worker(m)
    assert w["replicas"] == 4 and w["restartPolicy"] == "OnFailure"
    assert m["spec"]["elasticPolicy"] == {"rdzvBackend": "c10d", "minReplicas": 4, "maxReplicas": 4, "maxRestarts": 5}
    assert m["spec"]["nprocPerNode"] == "8"
    assert m["spec"]["runPolicy"]["backoffLimit"] == 4
    assert m["spec"]["runPolicy"]["suspend"] is True  # Kueue admits it
    container = w["template"]["spec"]["containers"][0]
    assert container["name"] == "pytorch"
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "8"
    assert container["command"][:3] == ["python", "-m", "torch.distributed.run"]
    assert container["command"][-3:] == ["-m", "nemoc.runtime.train", "/runs/exp/tasks/train_pretrain/task.json"]
    mounts = {v["name"]: v["mountPath"] for v in container["volumeMounts"]}
    assert mounts == {"dshm": "/dev/shm", "run": "/runs/exp", "data": "/data"}
    claims = {v["name"]: v.get("persistentVolumeClaim", {}).get("claimName") for v in w["template"]["spec"]["volumes"]}
    assert claims["run"] == "runs" and claims["data"] == "datasets"
    assert m["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "team-a"


def test_cpu_job_asks_for_no_gpus_and_still_validates():
    m = gpu_job(gpus_per_node=0, procs_per_node=2, nodes=2, opts=K8sOptions())
    assert "resources" not in worker(m)["template"]["spec"]["containers"][0]
    assert "suspend" not in m["spec"]["runPolicy"]
    assert check(m) == []


def test_yaml_round_trips_and_still_validates():
    m = gpu_job()
    assert yaml.safe_load(to_yaml(m)) == m
    assert check(yaml.safe_load(to_yaml(m))) == []


@pytest.mark.parametrize("mutate, message", [
    (lambda m: worker(m)["template"]["spec"]["containers"][0].__setitem__("imagePullPolcy", "x"),
     "imagePullPolcy: unknown field of V1Container"),
    (lambda m: m["spec"]["elasticPolicy"].__setitem__("maxReplicas", "four"), "maxReplicas: expected int"),
    (lambda m: m["spec"].pop("runPolicy"), "run_policy"),
    (lambda m: worker(m)["template"]["spec"]["containers"][0].pop("name"), "`name`, must not be `None`"),
    (lambda m: worker(m)["template"]["spec"].__setitem__("volumes", {"a": 1}), "volumes: expected a list"),
    (lambda m: m["spec"].__setitem__("pytorchReplicaSpecs", {"Worker": {"replicas": True}}), "replicas: expected int"),
])
def test_the_validator_catches_broken_manifests(mutate, message):
    m = gpu_job()
    mutate(m)
    problems = check(m)
    assert any(message in p for p in problems), problems


def test_names_are_dns_labels_short_enough_for_the_operators_services():
    name = job_name("My Experiment_with.a_very_long_name" * 3, "train:pretrain", "3f2a1b0c9d8e7f6a")
    assert len(name) <= 50 and name.endswith("-3f2a1b0c")
    assert all(c.islower() or c.isdigit() or c == "-" for c in name)


def test_bad_options_are_reported_at_compile_time():
    """Unknown names are refused by the compiled record; bad values are E047 at compile time
    (tests/diagnostics/scheduler_options.nemo); the launcher parses nothing."""
    from nemoc.compiler.params import UnknownParameter
    from nemoc.compiler.scheduler import option_problems

    with pytest.raises(UnknownParameter, match="scheduler `k8s` has no parameter `imagee`"):
        K8sOptions.of("k8s", {"imagee": "x"})
    problems = option_problems(K8sOptions(namespace="Bad Name", shm_size=" "))
    assert [name for name, _, _ in problems] == ["shm_size", "namespace"]


# ----------------------------------------------------------------------------------- whole graph


@pytest.fixture
def compiled(tmp_path):
    from plan_factory import make_plan, make_stage

    from nemoc.compiler.graph import build_graph
    from nemoc.compiler.spec import ClusterSpec
    from nemoc.runtime.orchestrate.rundir import RunDir

    (tmp_path / "corpus.jsonl").write_text('{"text": "hello world"}\n' * 20)
    plan = make_plan(tmp_path, stages=(make_stage("pretrain"), make_stage("anneal", after=("pretrain",))))
    cluster = ClusterSpec(gpu="H100", nodes=1, gpus_per_node=1, scheduler="k8s",
                          scheduler_options=MappingProxyType({"namespace": "ml", "checkpoint_pvc": "runs"}))
    plan = replace(plan, cluster=cluster)
    return plan, build_graph(plan), RunDir(tmp_path / "run")


def test_write_manifests_emits_one_valid_pytorchjob_per_training_task_in_order(compiled):
    plan, graph, run_dir = compiled
    paths = write_manifests(plan, graph, run_dir)
    assert [p.parent.name for p in paths] == ["train_pretrain", "train_anneal"]
    docs = list(yaml.safe_load_all((run_dir.root / "k8s" / "manifests.yaml").read_text()))
    assert [d["metadata"]["annotations"]["nemoc.dev/task-id"] for d in docs] == ["train:pretrain", "train:anneal"]
    assert docs[1]["metadata"]["annotations"]["nemoc.dev/after"] == "train:pretrain"
    for path, doc in zip(paths, docs):
        assert yaml.safe_load(path.read_text()) == doc
        assert check(doc) == []
        assert doc["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]["spec"]["containers"][0]["command"][-1] == \
            str(path.parent / "task.json")


# ----------------------------------------------------------------------------------- kubectl


FAKE_KUBECTL = r"""#!/bin/bash
echo "$*" >> "$FAKE_LOG"
case "$1" in
  apply) echo "pytorchjob.kubeflow.org/x created" ;;
  get) echo '{"status": {"conditions": [{"type": "Created", "status": "True"},
                                         {"type": "Succeeded", "status": "'"$FAKE_RESULT"'"},
                                         {"type": "Failed", "status": "'"$FAKE_FAILED"'"}]}}' ;;
  logs) echo "[pod/x-worker-0/pytorch] boom" ;;
  delete) echo "pytorchjob.kubeflow.org \"x\" deleted" ;;
esac
"""


@pytest.fixture
def fake_kubectl(tmp_path, monkeypatch):
    bin_dir = tmp_path / "kbin"
    bin_dir.mkdir()
    (bin_dir / "kubectl").write_text(FAKE_KUBECTL)
    (bin_dir / "kubectl").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_LOG", str(tmp_path / "kubectl.log"))
    return tmp_path / "kubectl.log"


def _spec(tmp_path: Path) -> LaunchSpec:
    out = tmp_path / "run" / "tasks" / "train_pretrain"
    out.mkdir(parents=True)
    (tmp_path / "run" / "plan.json").write_text(json.dumps({"experiment": "exp", "root": str(tmp_path)}))
    (out / "HASH").write_text("3f2a1b0c9d8e7f6a\n")
    return LaunchSpec(task_id="train:pretrain", module="nemoc.runtime.train", args=(str(out / "task.json"),), nproc=2,
                      out_dir=out, log_path=out / "log.txt", nodes=2, gpus_per_node=1)


def test_launch_applies_follows_and_records_the_job(tmp_path, fake_kubectl, monkeypatch):
    from nemoc.compiler.spec import ClusterSpec

    monkeypatch.setenv("FAKE_RESULT", "True")
    monkeypatch.setenv("FAKE_FAILED", "False")
    spec = _spec(tmp_path)
    (spec.out_dir / "DONE.json").write_text("{}")  # what the trainer writes on the shared volume
    launcher = K8sLauncher(cluster=ClusterSpec(gpu="H100", nodes=2, gpus_per_node=1, scheduler="k8s",
                                               scheduler_options=MappingProxyType({"namespace": "ml"})),
                           echo=lambda line: None, poll_s=0.01)
    result = launcher.launch(spec)
    assert result.ok
    calls = fake_kubectl.read_text().splitlines()
    assert calls[0] == f"apply -f {spec.out_dir / 'pytorchjob.yaml'}"
    assert calls[1].startswith("get pytorchjob nemoc-exp-train-pretrain-3f2a1b0c -n ml -o json")
    record = json.loads((tmp_path / "run" / "k8s.json").read_text())
    assert record["jobs"]["train:pretrain"]["name"] == "nemoc-exp-train-pretrain-3f2a1b0c"
    assert check(yaml.safe_load((spec.out_dir / "pytorchjob.yaml").read_text())) == []


def test_a_failed_job_reports_its_pods_last_lines(tmp_path, fake_kubectl, monkeypatch):
    from nemoc.compiler.spec import ClusterSpec

    monkeypatch.setenv("FAKE_RESULT", "False")
    monkeypatch.setenv("FAKE_FAILED", "True")
    launcher = K8sLauncher(cluster=ClusterSpec(gpu="CPU", nodes=2, gpus_per_node=1), echo=lambda line: None, poll_s=0.01)
    result = launcher.launch(_spec(tmp_path))
    assert not result.ok and "ended Failed" in result.error_tail and "boom" in result.error_tail


def test_without_kubectl_the_error_says_what_to_do(tmp_path, monkeypatch):
    from nemoc.compiler.spec import ClusterSpec

    monkeypatch.setenv("PATH", str(tmp_path / "nothing"))
    with pytest.raises(K8sError, match="kubectl is not on PATH.*--dry-run"):
        K8sLauncher(cluster=ClusterSpec(gpu="CPU", nodes=2, gpus_per_node=1), echo=lambda line: None)


def test_a_kubectl_apply_error_fails_the_task_with_its_message(tmp_path, fake_kubectl, monkeypatch):
    from nemoc.compiler.spec import ClusterSpec

    bad = tmp_path / "kbin" / "kubectl"
    bad.write_text('#!/bin/bash\necho "error: the server doesn\'t have a resource type pytorchjob" >&2\nexit 1\n')
    launcher = K8sLauncher(cluster=ClusterSpec(gpu="CPU", nodes=2, gpus_per_node=1), echo=lambda line: None)
    result = launcher.launch(_spec(tmp_path))
    assert result.returncode == 1 and "doesn't have a resource type pytorchjob" in result.error_tail
    # the manifest was written, for the user to inspect or apply
    assert (tmp_path / "run" / "tasks" / "train_pretrain" / "pytorchjob.yaml").exists()


def test_cancel_and_logs_of_a_k8s_run_use_kubectl(tmp_path, fake_kubectl, monkeypatch):
    from click.testing import CliRunner

    from nemoc.runtime.cli.cluster import cancel, logs

    run = tmp_path / "run"
    run.mkdir()
    (run / "status.json").write_text(json.dumps({"tasks": {"train:pretrain": {"state": "running"}}}))
    (run / "k8s.json").write_text(json.dumps({"jobs": {"train:pretrain": {"name": "x", "namespace": "ml"}}}))
    result = CliRunner().invoke(cancel, [str(run)])
    assert result.exit_code == 0 and "PyTorchJob ml/x" in result.output
    result = CliRunner().invoke(logs, [str(run), "pretrain"])
    assert result.exit_code == 0, result.output
    calls = fake_kubectl.read_text().splitlines()
    assert calls[0] == "delete pytorchjob x -n ml --ignore-not-found"
    assert calls[1] == "logs -n ml -l training.kubeflow.org/job-name=x --prefix"


def test_a_damaged_k8s_record_is_named_and_no_job_is_applied_untracked(tmp_path, fake_kubectl, monkeypatch):
    from click.testing import CliRunner

    from nemoc.compiler.spec import ClusterSpec
    from nemoc.runtime.cli.cluster import cancel, logs
    from nemoc.runtime.orchestrate.launch_k8s import K8sError, read_record

    spec = _spec(tmp_path)
    run = tmp_path / "run"
    (run / "status.json").write_text(json.dumps({"tasks": {"train:pretrain": {"state": "running"}}}))
    for damaged in ("{garbage", "[1]", json.dumps({"jobs": {"train:pretrain": 5}})):
        (run / "k8s.json").write_text(damaged)
        with pytest.raises(K8sError, match=r"k8s\.json is (unreadable|damaged).*repair or remove it"):
            read_record(run)
        for command, args in ((cancel, [str(run)]), (logs, [str(run), "pretrain"])):
            result = CliRunner().invoke(command, args, catch_exceptions=False)
            assert result.exit_code == 1 and "k8s.json is" in result.output, result.output
    launcher = K8sLauncher(cluster=ClusterSpec(gpu="CPU", nodes=2, gpus_per_node=1), echo=lambda line: None)
    result = launcher.launch(spec)
    assert result.returncode == 1 and "k8s.json is damaged" in result.error_tail
    assert not fake_kubectl.exists() or "apply" not in fake_kubectl.read_text()  # nothing applied


def test_manifest_for_spec_splits_processes_over_nodes(tmp_path):
    from nemoc.compiler.spec import ClusterSpec

    spec = replace(_spec(tmp_path), nproc=16, nodes=2, options={"namespace": "ml"})
    m = manifest_for_spec(spec, cluster=ClusterSpec(gpu="H100", nodes=2, gpus_per_node=8), experiment="exp",
                          run_root="/r", data_root=None)
    assert worker(m)["replicas"] == 2 and m["spec"]["nprocPerNode"] == "8"
    assert worker(m)["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "8"


def test_export_runs_on_the_host_and_eval_at_its_layout_in_the_manifests(compiled):
    from plan_factory import make_stage

    plan, _, run_dir = compiled
    from nemoc.compiler.graph import build_graph

    plan = replace(plan, cluster=replace(plan.cluster, nodes=2, gpus_per_node=1),
                   stages=(*plan.stages, make_stage("eval", "eval", after=("pretrain",)),
                           make_stage("export", "export", after=("pretrain",))))
    plan = replace(plan, stages=tuple(replace(s, layout=replace(s.layout, dp=2)) for s in plan.stages))
    write_manifests(plan, build_graph(plan), run_dir)
    docs = {d["metadata"]["annotations"]["nemoc.dev/task-id"]: d
            for d in yaml.safe_load_all((run_dir.root / "k8s" / "manifests.yaml").read_text())}

    def worker(task):
        return docs[task]["spec"]["pytorchReplicaSpecs"]["Worker"]

    def limits(task):
        return worker(task)["template"]["spec"]["containers"][0].get("resources", {}).get("limits", {})

    assert worker("train:pretrain")["replicas"] == 2 and limits("train:pretrain").get("nvidia.com/gpu") == "1"
    # eval runs at its stage's layout (dp=2 over two one-GPU nodes), like training
    assert worker("eval:eval")["replicas"] == 2 and limits("eval:eval").get("nvidia.com/gpu") == "1"
    assert worker("export:export")["replicas"] == 1 and "nvidia.com/gpu" not in limits("export:export")
    env = {e["name"]: e["value"] for e in worker("export:export")["template"]["spec"]["containers"][0]["env"]}
    assert env["CUDA_VISIBLE_DEVICES"] == ""
    assert all(check(doc) == [] for doc in docs.values())

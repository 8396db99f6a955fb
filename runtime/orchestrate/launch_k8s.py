"""The Kubernetes launcher: each distributed task of the runtime graph as a Kubeflow PyTorchJob.

Input:  a `LaunchSpec` from the executor (or, for `write_manifests`, the plan and the graph) and the
        options of `cluster { scheduler = k8s(namespace = "ml", image = "...", queue = "...") }`.
Output: one `kubeflow.org/v1` PyTorchJob manifest per task, `tasks/<id>/pytorchjob.yaml`; `launch`
        applies it with `kubectl apply -f` and follows the job's conditions to the end.
Why PyTorchJob (docs/clusters.md): the Kubeflow training operator already implements torchrun's c10d
rendezvous for us (with an `elasticPolicy` it points every worker's `PET_RDZV_ENDPOINT` at worker 0's
headless service and sets `PET_NNODES`/`PET_NPROC_PER_NODE`/`PET_MAX_RESTARTS`, which torchrun reads as
its defaults), restarts failed workers (`restartPolicy: OnFailure`, bounded by `runPolicy.backoffLimit`),
and has a maintained schema we can validate against (the `kubeflow-training` SDK's OpenAPI models).
A JobSet would need the rendezvous wired by hand (pod DNS names, ports) for the same result.
Invariants: the run directory is mounted at the same absolute path in every pod (task.json names
absolute paths), so the PVC named `checkpoint_pvc` must hold it; data sources are mounted read-only
from `data_pvc` at the experiment's root; /dev/shm is a memory-backed emptyDir (NCCL, data loaders).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path

import yaml

from nemoc.compiler.params import SCHEDULER_OPTIONS_TYPES, OptionsMismatch, options_for
from nemoc.runtime.faults import RESTART_SAFE_ENV
from nemoc.runtime.orchestrate.launchers import LaunchResult, LaunchSpec, LauncherError, nodes_for, read_job_record
from nemoc.runtime.orchestrate.rundir import atomic_write_json

API_VERSION = "kubeflow.org/v1"
KIND = "PyTorchJob"
CONTAINER = "pytorch"  # the training operator finds the training container by this name
RECORD_FILE = "k8s.json"
KUBECTL_MISSING = ("kubectl is not on PATH: install it and point it at the cluster, or write the manifests "
                   "without applying them (`nemoc run --dry-run --launcher k8s`, launch_k8s.write_manifests) "
                   "and apply tasks/*/pytorchjob.yaml yourself")


class K8sError(LauncherError):
    """A problem with the k8s options, kubectl or a job; the message is for the user."""


# `k8s(...)` as compiled (nemoc.compiler.params): every default filled, names checked as DNS-1123 labels at
# compile time (E047, compiler/scheduler.py). The launcher reads it as it is and parses nothing.
K8sOptions = SCHEDULER_OPTIONS_TYPES["k8s"]


def _options(cluster) -> K8sOptions:
    """The plan's `k8s(...)` options (defaults when the cluster names no scheduler options of its own)."""
    try:
        return options_for(cluster, "k8s")
    except OptionsMismatch as error:
        raise K8sError(str(error)) from None


def job_name(experiment: str, task_id: str, task_hash: str = "") -> str:
    """A DNS-1123 name, short enough for the operator's `<name>-worker-<i>` service names."""
    base = re.sub(r"[^a-z0-9]+", "-", f"nemoc-{experiment}-{task_id}".lower()).strip("-")
    suffix = re.sub(r"[^a-z0-9]", "", task_hash.lower())[:8]
    limit = 50 - (len(suffix) + 1 if suffix else 0)
    base = base[:limit].rstrip("-")
    return f"{base}-{suffix}" if suffix else base


def _label(value: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", value)[:63].strip("-_.") or "x"


def pytorchjob(*, name: str, task_id: str, module: str, args: tuple[str, ...], nodes: int, procs_per_node: int,
               gpus_per_node: int, run_root: str, data_root: str | None, opts: K8sOptions,
               env: Mapping[str, str] | None = None) -> dict:
    """The PyTorchJob manifest (a plain dict; `to_yaml` renders it)."""
    labels = {"app.kubernetes.io/managed-by": "nemoc", "nemoc.dev/task": _label(task_id)}
    if opts.queue:
        labels["kueue.x-k8s.io/queue-name"] = opts.queue
    resources: dict[str, dict[str, object]] = {}
    if gpus_per_node:
        gpus = str(gpus_per_node)  # a quantity: the API takes a string
        resources = {"limits": {"nvidia.com/gpu": gpus}, "requests": {"nvidia.com/gpu": gpus}}
    requests = {k: v for k, v in (("cpu", opts.cpu), ("memory", opts.memory)) if v}
    if requests:
        resources.setdefault("requests", {}).update(requests)
    mounts = [{"name": "dshm", "mountPath": "/dev/shm"}]
    volumes: list[dict] = [{"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": opts.shm_size}}]
    if opts.checkpoint_pvc:
        mounts.append({"name": "run", "mountPath": run_root})
        volumes.append({"name": "run", "persistentVolumeClaim": {"claimName": opts.checkpoint_pvc}})
    if opts.data_pvc and data_root:
        mounts.append({"name": "data", "mountPath": data_root, "readOnly": True})
        volumes.append({"name": "data", "persistentVolumeClaim": {"claimName": opts.data_pvc, "readOnly": True}})
    environment = {"PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false", **RESTART_SAFE_ENV, **(env or {})}
    container = {
        "name": CONTAINER,
        "image": opts.image,
        "imagePullPolicy": "IfNotPresent",
        # torchrun takes --nnodes, --nproc-per-node, --rdzv-backend/-endpoint and --max-restarts from
        # the PET_* variables the operator sets from elasticPolicy and nprocPerNode.
        "command": ["python", "-m", "torch.distributed.run", "-m", module, *args],
        "workingDir": run_root,
        "env": [{"name": k, "value": str(v)} for k, v in sorted(environment.items())],
        "volumeMounts": mounts,
    }
    if resources:
        container["resources"] = resources
    pod_spec: dict[str, object] = {"containers": [container], "volumes": volumes}
    if opts.service_account:
        pod_spec["serviceAccountName"] = opts.service_account
    if opts.priority_class:
        pod_spec["priorityClassName"] = opts.priority_class
    run_policy: dict[str, object] = {"backoffLimit": opts.backoff_limit, "cleanPodPolicy": "Running"}
    if opts.queue:
        run_policy["suspend"] = True  # Kueue unsuspends it when the quota admits it
    return {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "metadata": {"name": name, "namespace": opts.namespace, "labels": labels,
                     "annotations": {"nemoc.dev/task-id": task_id, "nemoc.dev/run-dir": run_root}},
        "spec": {
            "nprocPerNode": str(procs_per_node),
            "elasticPolicy": {"rdzvBackend": "c10d", "minReplicas": nodes, "maxReplicas": nodes,
                              "maxRestarts": opts.max_restarts},
            "runPolicy": run_policy,
            "pytorchReplicaSpecs": {
                "Worker": {
                    "replicas": nodes,
                    "restartPolicy": "OnFailure",
                    "template": {"metadata": {"labels": dict(labels)}, "spec": pod_spec},
                },
            },
        },
    }


def to_yaml(manifest: Mapping) -> str:
    return yaml.safe_dump(manifest, sort_keys=False, default_flow_style=False)


# ----------------------------------------------------------------------------------- validation


def validate(manifest: Mapping) -> list[str]:
    """Problems with `manifest` against the PyTorchJob schema published in the `kubeflow-training` SDK.

    The SDK's OpenAPI models (generated from the training operator's CRD, with the Kubernetes core
    models) give every field's JSON name and type; this walks the manifest through them and reports
    unknown fields, wrong types and missing required fields (the models' own client-side validation).
    Raises K8sError when the SDK is not installed."""
    try:
        import kubeflow.training.models as models
    except ImportError as exc:
        raise K8sError("validating manifests needs the `kubeflow-training` package (pip install kubeflow-training)") from exc
    problems: list[str] = []
    _walk(manifest, "KubeflowOrgV1PyTorchJob", "$", models, problems)
    if not problems:
        try:
            from kubeflow.training.api_client import ApiClient

            ApiClient()._ApiClient__deserialize(json.loads(json.dumps(manifest)), "KubeflowOrgV1PyTorchJob")
        except (ValueError, TypeError) as exc:  # a required field is None, a value out of its enum
            problems.append(f"$: {exc}")
    return problems


_PRIMITIVES = {"str": str, "int": int, "bool": bool, "float": (int, float), "object": object}


def _walk(value: object, type_name: str, path: str, models, problems: list[str]) -> None:
    if type_name.startswith("list["):
        if not isinstance(value, list):
            problems.append(f"{path}: expected a list, got {type(value).__name__}")
            return
        for i, item in enumerate(value):
            _walk(item, type_name[5:-1], f"{path}[{i}]", models, problems)
        return
    if type_name.startswith("dict("):
        if not isinstance(value, dict):
            problems.append(f"{path}: expected a mapping, got {type(value).__name__}")
            return
        inner = type_name[5:-1].split(", ", 1)[1]
        for key, item in value.items():
            _walk(item, inner, f"{path}.{key}", models, problems)
        return
    if type_name in _PRIMITIVES:
        expected = _PRIMITIVES[type_name]
        if type_name == "int" and isinstance(value, bool) or not isinstance(value, expected):
            problems.append(f"{path}: expected {type_name}, got {type(value).__name__} {value!r}")
        return
    cls = getattr(models, type_name, None)
    if cls is None:  # e.g. quantities (str or int): accept what the SDK itself cannot name
        return
    if not isinstance(value, dict):
        problems.append(f"{path}: expected a {type_name} mapping, got {type(value).__name__}")
        return
    by_json = {json_key: attr for attr, json_key in cls.attribute_map.items()}
    for key, item in value.items():
        if key not in by_json:
            problems.append(f"{path}.{key}: unknown field of {type_name} (known: {', '.join(sorted(by_json))})")
            continue
        _walk(item, cls.openapi_types[by_json[key]], f"{path}.{key}", models, problems)


# ----------------------------------------------------------------------------------- from the plan


def manifest_for_spec(spec: LaunchSpec, *, cluster, experiment: str, run_root: str, data_root: str | None,
                      task_hash: str = "", opts: K8sOptions | None = None) -> dict:
    nodes = nodes_for(spec)
    if spec.nproc % nodes:
        raise K8sError(f"{spec.task_id}: {spec.nproc} processes do not split evenly over {nodes} nodes")
    on_cpu = spec.gpus_per_node == 0 or str(getattr(cluster, "gpu", "")).upper() == "CPU"
    per_node = spec.nproc // nodes
    opts = opts or (spec.options if isinstance(spec.options, K8sOptions) else _options(cluster))
    return pytorchjob(name=job_name(experiment, spec.task_id, task_hash), task_id=spec.task_id, module=spec.module,
                      args=tuple(spec.args), nodes=nodes, procs_per_node=per_node,
                      gpus_per_node=0 if on_cpu else per_node, run_root=run_root, data_root=data_root, opts=opts,
                      env=spec.env)


def write_manifests(plan, graph, run_dir) -> list[Path]:
    """`--dry-run` for k8s: the manifest of every distributed task of `graph`, written to
    `tasks/<id>/pytorchjob.yaml` (and all of them to `k8s/manifests.yaml`), validated, not applied.
    Tasks run in the graph's topological order; `nemoc.dev/after` annotations record the edges."""
    from nemoc.runtime.orchestrate.tasks import TaskContext, TaskError, launch_shape
    from nemoc.runtime.orchestrate.tasks import get_kind as _get_kind

    def get_kind(name: str):
        try:
            return _get_kind(name)
        except TaskError as error:
            raise K8sError(str(error)) from None

    opts = _options(plan.cluster)
    root = Path(run_dir.root)
    written, documents = [], []
    for task in graph.tasks():
        kind = get_kind(task.kind)
        if kind.run_inline is not None:
            continue  # tokenizer / prepare run where `nemoc run` runs, into the shared run directory
        out_dir = run_dir.task_dir(task.id)
        ctx = TaskContext(task=task, plan=plan, plan_path=run_dir.plan_path, run_dir=run_dir, out_dir=out_dir, inputs={})
        nproc, gpus, env = launch_shape(kind, ctx)  # as the executor starts it
        spec = LaunchSpec(task_id=task.id, module=kind.module, args=(str(out_dir / "task.json"),), nproc=nproc,
                          out_dir=out_dir, log_path=out_dir / "log.txt", nodes=plan.cluster.nodes,
                          gpus_per_node=gpus, env=env, options=opts)
        manifest = manifest_for_spec(spec, cluster=plan.cluster, experiment=plan.experiment, run_root=str(root),
                                     data_root=str(Path(plan.root).resolve()), task_hash=task.hash, opts=opts)
        after = [a.src for a in graph.inputs(task.id) if get_kind(graph.task(a.src).kind).run_inline is None]
        if after:
            manifest["metadata"]["annotations"]["nemoc.dev/after"] = ",".join(after)
        _check(manifest)
        out_dir.mkdir(parents=True, exist_ok=True)
        path = out_dir / "pytorchjob.yaml"
        path.write_text(to_yaml(manifest))
        written.append(path)
        documents.append(manifest)
    (root / "k8s").mkdir(parents=True, exist_ok=True)
    (root / "k8s" / "manifests.yaml").write_text(yaml.safe_dump_all(documents, sort_keys=False))
    return written


def _check(manifest: Mapping) -> None:
    """Validate when the SDK is installed; a manifest we generate that fails is a bug worth stopping for."""
    try:
        problems = validate(manifest)
    except K8sError:
        return
    if problems:
        raise K8sError("generated PyTorchJob does not match the schema:\n  " + "\n  ".join(problems))


# ----------------------------------------------------------------------------------- kubectl


def kubectl(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    if shutil.which("kubectl") is None:
        raise K8sError(KUBECTL_MISSING)
    return subprocess.run(["kubectl", *args], capture_output=True, text=True, timeout=timeout)


def _kubectl_ok(*args: str) -> str:
    proc = kubectl(*args)
    if proc.returncode != 0:
        raise K8sError(f"kubectl {' '.join(args)} failed: {proc.stderr.strip() or proc.stdout.strip()}")
    return proc.stdout


def job_conditions(name: str, namespace: str) -> dict[str, str]:
    """{condition type: status} of a PyTorchJob (Created, Running, Restarting, Succeeded, Failed)."""
    out = _kubectl_ok("get", "pytorchjob", name, "-n", namespace, "-o", "json")
    status = json.loads(out).get("status", {}) or {}
    return {c.get("type", ""): c.get("status", "") for c in status.get("conditions", []) or []}


def read_record(run_root: str | Path) -> dict:
    """`k8s.json`; raises K8sError naming it when it is damaged (it holds the run's PyTorchJob names)."""
    return read_job_record(Path(run_root) / RECORD_FILE, launcher="k8s", keys={"name", "namespace"}, error=K8sError,
                           holds="PyTorchJobs", check="check `kubectl get pytorchjobs` for jobs of this run")


def write_record(run_root: str | Path, record: Mapping) -> None:
    atomic_write_json(Path(run_root) / RECORD_FILE, record)


class K8sLauncher:
    """`launch(spec)`: write the task's PyTorchJob, `kubectl apply` it, follow it until it ends."""

    name = "k8s"

    def __init__(self, *, cluster=None, echo=None, poll_s: float = 5.0, timeout_s: float | None = None,
                 experiment: str = "run") -> None:
        if shutil.which("kubectl") is None:  # checked here: `nemoc run` stops before any task runs
            raise K8sError(KUBECTL_MISSING)
        self.cluster = cluster
        self.options = _options(cluster)
        self.echo = echo if echo is not None else (lambda line: (sys.stdout.write(line), sys.stdout.flush()))
        self.poll_s, self.timeout_s, self.experiment = poll_s, timeout_s, experiment

    def launch(self, spec: LaunchSpec) -> LaunchResult:
        """Apply and follow; a problem applying is a failed task with the reason, not a traceback."""
        try:
            return self._launch(spec)
        except (K8sError, OSError, subprocess.TimeoutExpired, ValueError) as error:
            return LaunchResult(1, None, f"{spec.task_id} on Kubernetes: {error}")

    def _launch(self, spec: LaunchSpec) -> LaunchResult:
        out = Path(spec.out_dir).resolve()
        run_root = out.parent.parent
        experiment = _experiment_of(run_root) or self.experiment
        manifest = manifest_for_spec(spec, cluster=self.cluster, experiment=experiment, run_root=str(run_root),
                                     data_root=_data_root(run_root), task_hash=_hash_of(out), opts=self.options)
        _check(manifest)
        path = out / "pytorchjob.yaml"
        out.mkdir(parents=True, exist_ok=True)
        path.write_text(to_yaml(manifest))
        name, namespace = manifest["metadata"]["name"], manifest["metadata"]["namespace"]
        record = read_record(run_root)  # before applying: a damaged record must not leave an untracked job
        _kubectl_ok("apply", "-f", str(path))
        record["jobs"][spec.task_id] = {"name": name, "namespace": namespace, "manifest": str(path),
                                        "submitted_at": time.time()}
        write_record(run_root, record)
        self.echo(f"applied PyTorchJob {namespace}/{name} ({manifest['spec']['pytorchReplicaSpecs']['Worker']['replicas']}"
                  f" worker(s)); follow it with `nemoc logs {run_root} {spec.task_id} -f`\n")
        try:
            state = self._follow(name, namespace)
        except BaseException:
            kubectl("delete", "pytorchjob", name, "-n", namespace, "--ignore-not-found")
            raise
        if state == "Succeeded" and (out / "DONE.json").exists():
            return LaunchResult(0)
        logs = kubectl("logs", "-n", namespace, "-l", f"training.kubeflow.org/job-name={name}", "--tail", "25",
                       "--prefix")
        return LaunchResult(1, None, f"PyTorchJob {namespace}/{name} ended {state}\n{logs.stdout}")

    def _follow(self, name: str, namespace: str) -> str:
        deadline = None if self.timeout_s is None else time.monotonic() + self.timeout_s
        last = ""
        while True:
            conditions = job_conditions(name, namespace)
            current = next((t for t in ("Succeeded", "Failed", "Restarting", "Running", "Created")
                            if conditions.get(t) == "True"), "Pending")
            if current != last:
                self.echo(f"PyTorchJob {name}: {current}\n")
                last = current
            if current in ("Succeeded", "Failed"):
                return current
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"PyTorchJob {name} did not finish within {self.timeout_s} s")
            time.sleep(self.poll_s)


def _experiment_of(run_root: Path) -> str | None:
    try:
        return json.loads((run_root / "plan.json").read_text())["experiment"]
    except (OSError, ValueError, KeyError):
        return None


def _data_root(run_root: Path) -> str | None:
    try:
        return str(Path(json.loads((run_root / "plan.json").read_text())["root"]).resolve())
    except (OSError, ValueError, KeyError):
        return None


def _hash_of(out_dir: Path) -> str:
    try:
        return (out_dir / "HASH").read_text().strip()
    except OSError:
        return ""



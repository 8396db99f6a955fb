"""What each scheduler accepts of its options, checked once at compile time.

Input:  a scheduler's typed options (`nemoc.compiler.params.SchedulerOptions`, lowered from
        `cluster { scheduler = slurm(...) | k8s(...) }`: every default filled, durations in whole
        seconds by the language's one duration grammar, integers already range-checked by the schema).
Output: `option_problems(options)`: (argument, message, hint) for each value the scheduler would
        refuse or misread: a control character in a value written into an sbatch script or a
        manifest, an `extra` entry that is not an sbatch option, a Kubernetes name that is not a
        DNS-1123 label. Lowering reports each as E047 at the argument; the launchers then take the
        record as it is and parse nothing.
Invariants: pure; no torch; the launchers hold no option grammar of their own.
"""

from __future__ import annotations

import re

from nemoc.compiler.params import SchedulerOptions

CONTROL = re.compile(r"[\x00-\x1f\x7f]")
DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")
# the k8s options that name Kubernetes objects (metadata.name rules: RFC 1123 labels)
K8S_NAMES = ("namespace", "data_pvc", "checkpoint_pvc", "queue", "service_account", "priority_class")


def option_problems(options: SchedulerOptions) -> list[tuple[str, str, str]]:
    """Every value of `options` its scheduler cannot take, as (argument, message, hint)."""
    problems: list[tuple[str, str, str]] = []
    scheduler = options.SCHEDULER
    for name, value in options.items():
        for text in value if isinstance(value, tuple) else (value,):
            if isinstance(text, str) and CONTROL.search(text):
                problems.append((name, f"{scheduler} option `{name}` = {text!r} contains a newline or control "
                                       f"character", "each value is written into one line of the job script"))
    if scheduler == "slurm":
        for item in options.extra:
            if not item.startswith("-"):
                problems.append(("extra", f"slurm option `extra` entry {item!r} is not an sbatch option",
                                 "write each option as sbatch takes it, e.g. [\"--exclusive\", \"--gres=gpu:8\"]"))
        for name in ("time", "signal_lead"):
            value = getattr(options, name)
            if value is not None and value != int(value):
                problems.append((name, f"slurm option `{name}` = {value:g} s is not a whole number of seconds",
                                 "Slurm counts whole seconds: e.g. 4h, 90min, 30s"))
    if scheduler == "k8s":
        for name, value in options.items():
            if isinstance(value, str) and not value.strip():
                problems.append((name, f"k8s option `{name}` is empty", "leave it out to take the default"))
        for name in K8S_NAMES:
            value = getattr(options, name)
            if value and value.strip() and not DNS_LABEL.fullmatch(value):
                problems.append((name, f"k8s option `{name}` = {value!r} is not a Kubernetes name",
                                 "lower-case letters, digits and '-', at most 63 characters, starting and "
                                 "ending with a letter or digit"))
    return problems

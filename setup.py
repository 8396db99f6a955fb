"""Maps the top-level folders onto sub-packages of the `nemoc` namespace.

grammar/ -> nemoc.grammar, dsl/ -> nemoc.dsl, compiler/ -> nemoc.compiler, runtime/ -> nemoc.runtime
(and their sub-packages), so the distribution takes no generic top-level import name. Everything else
lives in pyproject.toml.
"""
from setuptools import find_packages, setup

TOP_LEVEL = ("grammar", "dsl", "compiler", "runtime")

packages, package_dir = [], {}
for top in TOP_LEVEL:
    for sub in [top] + [f"{top}.{p}" for p in find_packages(top)]:
        packages.append(f"nemoc.{sub}")
        package_dir[f"nemoc.{sub}"] = sub.replace(".", "/")

setup(packages=packages, package_dir=package_dir)

"""Package discovery for this repository's layout, which pyproject.toml cannot express: the
top-level folders export/, runtime/, quant/, devices/ and benchmarks/ install as omnilite.export,
omnilite.runtime, ... Every folder under them is found (data folders as namespace packages, whose
files pyproject.toml's package-data takes), so a new subpackage or data folder needs no edit here.
Metadata and dependencies are in pyproject.toml."""

from setuptools import find_namespace_packages, setup

TOP_LEVEL = ("omnilite", "export", "runtime", "quant", "devices", "benchmarks")
# Benchmark outputs and bytecode caches sit in the package folders but are not part of the package.
NOT_PACKAGED = ["results", "results.*", "*__pycache__*"]


def _packages() -> list[str]:
    found = []
    for top in TOP_LEVEL:
        name = top if top == "omnilite" else f"omnilite.{top}"
        found += [name, *(f"{name}.{p}" for p in find_namespace_packages(top, exclude=NOT_PACKAGED))]
    return found


setup(packages=_packages(), package_dir={"omnilite": "omnilite", **{f"omnilite.{t}": t for t in TOP_LEVEL[1:]}})

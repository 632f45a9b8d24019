"""The one thing pyproject.toml cannot say: the top-level ds_configs/ and tools/ directories (kept where users edit
them) ship inside the package as mmcoconut.ds_configs and mmcoconut.tools ([tool.setuptools.package-dir] maps them).
Everything else is in pyproject.toml."""
from setuptools import find_packages, setup

setup(packages=find_packages(include=["mmcoconut", "mmcoconut.*"]) + ["mmcoconut.ds_configs", "mmcoconut.tools"])

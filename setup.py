"""The one thing pyproject.toml cannot say: the top-level ds_configs/ directory (kept where users edit it) ships
inside the package as mmcoconut.ds_configs ([tool.setuptools.package-dir] maps it). Everything else is in
pyproject.toml."""
from setuptools import find_packages, setup

setup(packages=find_packages(include=["mmcoconut", "mmcoconut.*"]) + ["mmcoconut.ds_configs"])

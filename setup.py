"""Thin shim: tff_fad's packaging metadata is in pyproject.toml (PEP 621)."""

import setuptools

setuptools.setup()

"""Shared pytest fixtures: the ActionFormer parity cases (see parity_cases.py)."""

import pytest

import os

# TensorFlow's CPU kernels as the command-line tools set them (oneDNN), before it is imported.
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")

from parity_cases import PARITY_CASES, ParityCase, load_parity_case


@pytest.fixture(params=PARITY_CASES)
def parity_case(request) -> ParityCase:
  return load_parity_case(request.param)

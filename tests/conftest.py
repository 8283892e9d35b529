"""Shared pytest fixtures: the ActionFormer parity cases (see parity_cases.py)."""

import pytest

import asl_tf  # pylint: disable=unused-import  (TensorFlow's CPU kernels as users get them: oneDNN)

from parity_cases import PARITY_CASES, ParityCase, load_parity_case


@pytest.fixture(params=PARITY_CASES)
def parity_case(request) -> ParityCase:
  return load_parity_case(request.param)

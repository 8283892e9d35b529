"""The ActionFormer parity cases in tests/fixtures/actionformer_parity (see PARITY_DIR)."""

import dataclasses
import functools
import json
import os

import numpy as np

from asl_tf import config as config_lib

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Committed with the tests, so that a plain clone proves parity (ASL_PARITY_DIR overrides it).
PARITY_DIR = os.environ.get("ASL_PARITY_DIR", os.path.join(
    os.path.dirname(os.path.abspath(__file__)), "fixtures", "actionformer_parity"))
PARITY_CASES = ("thumos_like", "anet_like")


@dataclasses.dataclass(frozen=True)
class ParityCase:
  """One reference case: `meta` (the JSON), `arrays` (the npz as a dict), `params` (the
  `param/*` arrays keyed by state_dict name) and `model_config` (the matching ModelConfig)."""
  name: str
  meta: dict
  arrays: dict
  params: dict
  model_config: config_lib.ModelConfig


def model_config_from_actionformer(meta: dict) -> config_lib.ModelConfig:
  """ModelConfig equal to an ActionFormer config (`model` and `train_cfg` sections)."""
  model, train = meta["model"], meta["train_cfg"]
  win = model["n_mha_win_size"]
  num_levels = model["backbone_arch"][2] + 1
  win = tuple(win) if isinstance(win, (list, tuple)) else (win,) * num_levels
  return config_lib.ModelConfig(
      input_dim=model["input_dim"], num_classes=model["num_classes"],
      max_seq_len=model["max_seq_len"], backbone_arch=tuple(model["backbone_arch"]),
      scale_factor=model["scale_factor"], embd_dim=model["embd_dim"],
      embd_kernel_size=model["embd_kernel_size"], embd_with_ln=model["embd_with_ln"],
      fpn_dim=model["fpn_dim"], fpn_with_ln=model["fpn_with_ln"], head_dim=model["head_dim"],
      head_num_layers=model["head_num_layers"], head_kernel_size=model["head_kernel_size"],
      head_with_ln=model["head_with_ln"], n_head=model["n_head"], mha_win_size=win,
      use_abs_pe=model["use_abs_pe"], dropout=train["dropout"], droppath=train["droppath"],
      cls_prior_prob=train["cls_prior_prob"], head_empty_cls=tuple(train["head_empty_cls"]),
      regression_range=tuple(tuple(r) for r in model["regression_range"]))


def parity_file(filename: str) -> str:
  """The path of a parity fixture file (never skipped: a missing file fails the test)."""
  path = os.path.join(PARITY_DIR, filename)
  if not os.path.exists(path):
    raise FileNotFoundError(f"parity fixture {path} is missing (tests/fixtures in the repo)")
  return path


@functools.lru_cache(maxsize=None)
def load_parity_case(name: str) -> ParityCase:
  """Loads `NAME.json` and `NAME.npz`."""
  base = parity_file(name + ".npz")[:-len(".npz")]
  with open(base + ".json") as f:
    meta = json.load(f)
  with np.load(base + ".npz") as data:
    arrays = {k: data[k] for k in data.files}
  params = {k[len("param/"):]: v for k, v in arrays.items() if k.startswith("param/")}
  return ParityCase(name, meta, arrays, params, model_config_from_actionformer(meta))



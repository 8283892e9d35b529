"""Parity with the PyTorch ActionFormer (its numbers: tests/fixtures/actionformer_parity)."""

import dataclasses

import numpy as np
import pytest

from asl_tf.modeling import detector as detector_lib
from asl_tf.modeling import kernels
from asl_tf.modeling import weight_mapping
from parity_cases import load_parity_case


def _run(case, policy):
  detector = detector_lib.ASLDetector(dataclasses.replace(case.model_config,
                                                          kernel_policy=policy))
  report = weight_mapping.load_actionformer_weights(detector, case.params,
                                                    source_config=case.meta["model"])
  features = np.transpose(case.arrays["input/features"], (0, 2, 1))  # [B, C, T] -> [B, T, C]
  mask = case.arrays["input/mask"]
  backbone_features, _ = detector.backbone(features, mask)
  return detector, report, detector(features, mask), backbone_features


def _assert_close(name, got, expected, valid):
  """Within 1e-4 of the tensor's scale on valid frames; zero wherever the reference is zero."""
  scale = max(np.abs(expected).max(), 1e-6)
  valid = np.broadcast_to(valid, got.shape)
  err = np.abs(got - expected)[valid].max() / scale
  assert err < 1e-4, f"{name}: max relative error {err:.2e}"
  ref_zero = expected == 0.0
  np.testing.assert_array_equal(got[ref_zero], 0.0, err_msg=f"{name}: padded outputs")


@pytest.fixture(scope="module", params=[(name, policy) for name in ("thumos_like", "anet_like")
                                        for policy in ("reference", "fast", "fast_winograd")],
                ids=lambda p: "-".join(p))
def parity_run(request):
  """Every kernel policy. `fast_winograd`: `fast` with every dense kernel-3 stride-1 conv (the
  fixtures' dims are 32) as Winograd F(4, 3). (`portable` differs from `fast` only in graphs.)"""
  name, policy = request.param
  case = load_parity_case(name)
  with pytest.MonkeyPatch.context() as patch:
    if policy == "fast_winograd":
      patch.setattr(kernels, "WINOGRAD_MIN_CHANNELS", 1)
    yield (case,) + _run(case, policy.split("_")[0])


def test_every_level_matches_actionformer(parity_run):
  case, detector, report, out, backbone_features = parity_run
  assert report.complete and len(report.loaded) == len(case.params)
  mc = case.model_config
  offset = 0
  for l in range(mc.num_levels):
    ref_mask = case.arrays[f"output/mask_{l}"]
    t_l = ref_mask.shape[1]
    np.testing.assert_array_equal(out["level_masks"][l].numpy(), ref_mask)
    np.testing.assert_array_equal(out["padding_mask"].numpy()[:, offset:offset + t_l], ref_mask)
    valid = ref_mask[..., None]
    everywhere = np.ones_like(valid)
    _assert_close(f"backbone_{l}", backbone_features[l].numpy(),
                  case.arrays[f"output/backbone_{l}"].transpose(0, 2, 1), everywhere)
    _assert_close(f"fpn_{l}", out["level_features"][l].numpy(),
                  case.arrays[f"output/fpn_{l}"].transpose(0, 2, 1), everywhere)
    _assert_close(f"cls_logits_{l}", out["cls_logits"].numpy()[:, offset:offset + t_l],
                  case.arrays[f"output/cls_logits_{l}"], valid)
    _assert_close(f"offsets_{l}", out["offsets"].numpy()[:, offset:offset + t_l],
                  case.arrays[f"output/offsets_{l}"], valid)
    np.testing.assert_array_equal(out["points"].numpy()[offset:offset + t_l],
                                  case.arrays[f"output/points_{l}"])
    offset += t_l
  assert out["cls_logits"].shape == (2, offset, mc.num_classes)
  # The second video is shorter: padding changes its outputs (the masks matter here).
  assert not case.arrays["input/mask"][1].all()


def test_state_dict_round_trip(parity_run):
  case, detector = parity_run[0], parity_run[1]
  exported = weight_mapping.to_actionformer_state_dict(detector)
  assert exported.keys() == case.params.keys()
  for name, value in case.params.items():
    np.testing.assert_array_equal(exported[name], value, err_msg=name)
  names = weight_mapping.keras_to_actionformer_names(detector)
  assert sorted(names.values()) == sorted(case.params)

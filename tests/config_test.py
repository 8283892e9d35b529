"""Flagfiles parse into valid configs; inconsistent settings fail with what to change."""

import json
import os

import pytest

from asl_tf import config as config_lib
from asl_tf import flags as asl_flags

CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(__file__)), "configs")
FLAGFILES = sorted(f for f in os.listdir(CONFIG_DIR) if f.endswith(".flags") and f != "base.flags")


def _parse(argv):
  asl_flags.FLAGS.unparse_flags()
  asl_flags.parse_argv(["prog"] + argv)
  return asl_flags.build_config()


@pytest.mark.parametrize("name", FLAGFILES)
def test_every_flagfile_builds_a_valid_config(name):
  cfg = _parse([f"--flagfile={os.path.join(CONFIG_DIR, name)}"])
  assert cfg.model.max_seq_len % cfg.model.max_div_factor == 0
  assert len(cfg.model.regression_range) == cfg.model.num_levels


def test_dense_configs_fit_their_densest_videos():
  """No ground truth dropped from training for want of room: Ego4D-MQ's real annotation file
  (the one dense set whose annotations are here) fits --max_segments; the other dense configs
  leave room for more than 1,000 segments (MultiThumos) / 100 (Charades)."""
  ego4d = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "..",
                       "shared", "data", "ego4d_mq", "ego4d_clip_annotations_v2.json")
  densest = 88  # the train clip with the most moments, if the file is not here
  if os.path.exists(ego4d):
    with open(ego4d) as f:
      densest = max(len(v["annotations"]) for v in json.load(f).values())
  assert _parse([f"--flagfile={CONFIG_DIR}/ego4d.flags"]).data.max_segments >= densest
  assert _parse([f"--flagfile={CONFIG_DIR}/multithumos.flags"]).data.max_segments > 1000
  assert _parse([f"--flagfile={CONFIG_DIR}/charades.flags"]).data.max_segments > 100


def test_nested_flagfile_resolves_relative_to_its_file_and_command_line_wins(tmp_path):
  cwd = os.getcwd()
  os.chdir(tmp_path)  # base.flags is named relative to configs/, not to the cwd
  try:
    cfg = _parse([f"--flagfile={os.path.join(CONFIG_DIR, 'anet.flags')}", "--epochs=3",
                  "--feature_ext=npz"])
  finally:
    os.chdir(cwd)
  assert cfg.model.mha_win_size == (7, 7, 7, 7, 7, -1)
  assert cfg.data.feature_ext == ".npz"
  assert cfg.train.epochs == 3
  assert cfg.model.droppath == 0.1  # from base.flags
  assert cfg.eval.tiou_thresholds[0] == 0.5 and len(cfg.eval.tiou_thresholds) == 10


def test_anet_max_div_factor_is_96():
  model = config_lib.ModelConfig(mha_win_size=(7, 7, 7, 7, 7, -1), max_seq_len=192)
  # levels 0..4: stride * 6; level 5 global: stride 32 -> max 16 * 6 = 96.
  assert model.max_div_factor == 96


def test_thumos_max_div_factor_is_576():
  assert config_lib.ModelConfig().max_div_factor == 32 * 18


def test_indivisible_max_seq_len_names_the_fix():
  with pytest.raises(config_lib.ConfigError, match=r"max_seq_len=2300 .*2304"):
    _parse([f"--flagfile={os.path.join(CONFIG_DIR, 'thumos_i3d.flags')}", "--max_seq_len=2300"])


def test_regression_range_must_match_levels():
  with pytest.raises(config_lib.ConfigError, match="regression_range has 6 levels but the "
                     "backbone has 8"):
    _parse([f"--flagfile={os.path.join(CONFIG_DIR, 'thumos_i3d.flags')}",
            "--backbone_arch=2,2,7", "--max_seq_len=4608"])


def test_json_round_trip():
  cfg = _parse([f"--flagfile={os.path.join(CONFIG_DIR, 'ego4d.flags')}"])
  again = config_lib.Config.from_json(cfg.to_json())
  assert again == cfg
  assert again.data.feature_dir == cfg.data.feature_dir and isinstance(again.data.feature_dir,
                                                                        tuple)


def test_unknown_field_in_saved_config_is_named():
  d = config_lib.Config().to_dict()
  d["model"]["embed_dims"] = 3
  with pytest.raises(config_lib.ConfigError, match="embed_dims"):
    config_lib.Config.from_dict(d)


def test_missing_flagfile_is_named():
  with pytest.raises(config_lib.ConfigError, match="nope.flags"):
    asl_flags.expand_flagfiles(["--flagfile=nope.flags"])


@pytest.mark.parametrize("argv,message", [
    (["--learning_rate=0"], r"--learning_rate=0.0 must be positive"),
    (["--learning_rate=-1e-4"], r"--learning_rate=-0.0001 must be positive"),
    (["--batch_size=0"], r"--batch_size=0 must be a positive number of videos"),
    (["--batch_size=-1"], r"--batch_size=-1 must be a positive"),
    (["--n_head=0"], r"--n_head=0 must be a positive integer"),
    (["--feat_stride=0"], r"--feat_stride=0.0 must be a positive number of frames"),
    (["--max_seq_len=0"], r"--max_seq_len=0 must be a positive length"),
    (["--epochs=0"], r"--epochs=0 must be at least 1"),
    (["--mha_win_size=abc"], r"--mha_win_size=abc: expected comma-separated integers"),
    (["--tiou_thresholds=abc"], r"--tiou_thresholds=abc: expected comma-separated numbers"),
    (["--tiou_thresholds=0.5,1.5"], r"--tiou_thresholds=0.5,1.5 needs one or more values"),
    (["--feature_dir=feats,"], r"--feature_dir=feats, has an empty entry"),
    (["--sensitivity_sigma_floor=0"], r"--sensitivity_sigma_floor=0.0: use a value in \(0, 1\)"),
])
def test_bad_flag_values_are_named_up_front(argv, message):
  """Each used to train backwards, divide by zero or fail deep inside TensorFlow."""
  with pytest.raises(config_lib.ConfigError, match=message):
    _parse(argv)


def test_unknown_or_malformed_flag_is_one_line_naming_it():
  with pytest.raises(config_lib.ConfigError, match=r"epochz.*Did you mean.*epochs") as e:
    _parse(["--epochz=3"])
  assert "\n" not in str(e.value)
  with pytest.raises(config_lib.ConfigError, match=r"--epochs"):
    _parse(["--epochs=three"])


def test_entry_points_end_with_one_line_on_a_bad_flag():
  """No absl traceback: the tool's name and the message, exit status 1."""
  with pytest.raises(SystemExit) as e:
    asl_flags.cli_parser("asl_tf.evaluate")(["prog", "--checkpont=runs/x"])
  assert str(e.value).startswith("asl_tf.evaluate: Unknown command line flag 'checkpont'")
  assert "checkpoint" in str(e.value)


@pytest.mark.parametrize("tool", sorted(asl_flags.TOOL_FLAGS))
def test_each_tools_help_lists_its_own_flags_and_exits_0(tool, capsys):
  with pytest.raises(SystemExit) as e:
    asl_flags.cli_parser(tool)(["prog", "--help"])
  assert e.value.code == 0
  out = capsys.readouterr().out
  listed = {line.split()[0].split("=")[0] for line in out.splitlines()
            if line.startswith("  --")}
  want = {f"--{n}" for names in asl_flags.TOOL_FLAGS[tool].values() for n in names}
  assert listed == want and len(out.splitlines()) <= 70
  assert "--helpfull" in out


# ActionFormer's architecture constants that no flag changes (fixed by the method).
FIELDS_WITHOUT_FLAGS = {("model", "scale_factor"), ("model", "embd_with_ln"),
                        ("model", "fpn_with_ln"), ("model", "head_kernel_size"),
                        ("model", "head_with_ln"), ("loss", "focal_alpha"),
                        ("loss", "focal_gamma"), ("loss", "loss_norm_momentum")}


def test_flag_defaults_equal_the_dataclass_defaults():
  """The flags and the dataclasses agree on every default (paths aside: flags make them
  absolute), and every field a flag does not reach is a listed constant."""
  absl_flags = asl_flags.FLAGS
  absl_flags.unparse_flags()
  try:
    asl_flags.parse_argv(["test"])
    from_flags = asl_flags.build_config(check=False)
  finally:
    absl_flags.unparse_flags()
  defaults = config_lib.Config()
  unreached = set()
  for section in ("data", "model", "loss", "train", "eval", "export"):
    flagged, default = getattr(from_flags, section), getattr(defaults, section)
    for name, value in vars(default).items():
      flag = asl_flags._FLAG_OF_FIELD.get((section, name), name)  # pylint: disable=protected-access
      if flag not in absl_flags:
        unreached.add((section, name))
      elif name in ("output_dir", "export_dir"):
        assert getattr(flagged, name) == os.path.abspath(value), name
      else:
        assert getattr(flagged, name) == value, f"{section}.{name}"
  assert unreached == FIELDS_WITHOUT_FLAGS


def test_a_config_saved_with_a_removed_field_loads():
  old = config_lib.Config().to_dict()
  old["model"]["max_buffer_len_factor"] = 6.0  # saved by earlier versions; never used
  assert config_lib.Config.from_dict(old) == config_lib.Config()


def test_a_config_saved_before_normalisation_existed_keeps_its_behaviour():
  """Runs saved without `sensitivity_normalization` trained without it: loading (to evaluate or
  resume) must not switch today's default on; a section saved with it keeps its value."""
  old = config_lib.Config().to_dict()
  del old["loss"]["sensitivity_normalization"]
  assert config_lib.Config.from_dict(old).loss.sensitivity_normalization == "none"
  assert config_lib.Config.from_dict(config_lib.Config().to_dict()) == config_lib.Config()
  assert config_lib.Config.from_dict({}).loss.sensitivity_normalization == "instance"

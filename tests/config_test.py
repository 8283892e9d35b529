"""Flagfiles parse into valid configs; inconsistent settings fail with what to change."""

import dataclasses
import importlib
import json
import os

import pytest

from asl_tf import config as config_lib
from asl_tf import flags as asl_flags

CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(__file__)), "configs")
FLAGFILES = sorted(f for f in os.listdir(CONFIG_DIR) if f.endswith(".flags"))
BENCH_DIR = os.path.join(os.path.dirname(CONFIG_DIR), "benchmarks")


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
  """No ground truth dropped from training for want of room: Ego4D-MQ's and THUMOS14's real
  annotation files (the sets whose annotations are here) fit --max_segments; the other dense
  configs leave room for more than 1,000 segments (MultiThumos) / 100 (Charades)."""
  ego4d = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "..",
                       "shared", "data", "ego4d_mq", "ego4d_clip_annotations_v2.json")
  densest = 88  # the train clip with the most moments, if the file is not here
  if os.path.exists(ego4d):
    with open(ego4d) as f:
      densest = max(len(v["annotations"]) for v in json.load(f).values())
  assert _parse([f"--flagfile={CONFIG_DIR}/ego4d.flags"]).data.max_segments >= densest
  # THUMOS14 is not dense, but two validation (training) videos hold 102 and 128 segments; the
  # default 100 dropped some of them from training, where ActionFormer keeps all.
  thumos = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "..",
                        "shared", "data", "thumos14", "thumos14.json")
  densest = 128
  if os.path.exists(thumos):
    with open(thumos) as f:
      densest = max(len(v["annotations"]) for v in json.load(f)["database"].values()
                    if v["subset"].lower() == "validation")
  assert _parse([f"--flagfile={CONFIG_DIR}/thumos_i3d.flags"]).data.max_segments >= densest
  assert _parse([f"--flagfile={CONFIG_DIR}/multithumos.flags"]).data.max_segments > 1000
  assert _parse([f"--flagfile={CONFIG_DIR}/charades.flags"]).data.max_segments > 100


def test_nested_flagfile_resolves_relative_to_its_file_and_command_line_wins(tmp_path):
  (tmp_path / "configs").mkdir()
  (tmp_path / "configs" / "base.flags").write_text("--droppath=0.2\n--epochs=7\n")
  (tmp_path / "run.flags").write_text("# a comment\n--flagfile=configs/base.flags\n--epochs=5\n")
  cwd = os.getcwd()
  os.chdir(CONFIG_DIR)  # nested names resolve against their file, not the cwd
  try:
    cfg = _parse([f"--flagfile={tmp_path / 'run.flags'}", "--feature_ext=npz"])
    anet = _parse([f"--flagfile={os.path.join(CONFIG_DIR, 'anet.flags')}", "--epochs=3"])
  finally:
    os.chdir(cwd)
  assert cfg.model.droppath == 0.2 and cfg.train.epochs == 5  # the later line wins
  assert cfg.data.feature_ext == ".npz"
  assert anet.model.mha_win_size == (7, 7, 7, 7, 7, -1) and anet.train.epochs == 3
  assert anet.eval.tiou_thresholds[0] == 0.5 and len(anet.eval.tiou_thresholds) == 10


@pytest.mark.parametrize("path", [os.path.join(CONFIG_DIR, f) for f in FLAGFILES]
                         + [os.path.join(BENCH_DIR, f) for f in sorted(os.listdir(BENCH_DIR))
                            if f.endswith(".flags")])
def test_flagfiles_hold_only_what_differs_from_the_defaults(path):
  """The dataclasses are the one source of defaults: a flagfile line that repeats one would
  silently pin it when the default changes."""
  defaults = config_lib.absolute_paths(config_lib.Config())
  with open(path) as f:
    lines = [l.strip() for l in f if l.startswith("--") and not l.startswith("--flagfile")]
  assert lines
  for line in lines:
    asl_flags.FLAGS.unparse_flags()
    asl_flags.parse_argv(["prog", line])
    assert asl_flags.build_config(check=False) != defaults, f"{path}: {line} is the default"
  asl_flags.FLAGS.unparse_flags()


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


def test_missing_flagfile_is_named(tmp_path):
  with pytest.raises(config_lib.ConfigError, match="nope.flags") as e:
    asl_flags.expand_flagfiles(["--flagfile=nope.flags"])
  assert "base.flags" not in str(e.value)
  # A user's flagfile that still includes the removed configs/base.flags says what to do.
  old = tmp_path / "mine.flags"
  old.write_text("--flagfile=configs/base.flags\n--epochs=3\n")
  with pytest.raises(config_lib.ConfigError, match=r"'configs/base.flags' not found .*defaults, "
                     r"which now live in asl_tf/config.py: drop the line that includes it"):
    asl_flags.expand_flagfiles([f"--flagfile={old}"])


@pytest.mark.parametrize("argv,message", [
    (["--learning_rate=0"], r"--learning_rate=0.0 must be positive"),
    (["--learning_rate=-1e-4"], r"--learning_rate=-0.0001 must be positive"),
    (["--learning_rate=inf"], r"--learning_rate=inf must be positive"),
    (["--instance_weight_power=inf"], r"--instance_weight_power=inf must be positive and finite"),
    (["--instance_weight_power=0"], r"--instance_weight_power=0.0 must be positive and finite"),
    (["--weight_decay=nan"], r"--weight_decay=nan must be >= 0"),
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
    (["--scale_factor=3"], r"--scale_factor=3 must be an even integer >= 2"),
    (["--head_kernel_size=4"], r"--head_kernel_size=4 must be a positive odd integer"),
    (["--embd_kernel_size=2"], r"--embd_kernel_size=2 must be a positive odd integer"),
    (["--instance_weighted_losses=focal"],
     r"instance_weighted_losses.*both\|classification\|regression"),
    (["--sensitivity_normalization=batch"], r"sensitivity_normalization.*none\|instance\|video"),
    # Was a ValueError traceback from the detector's build (the demo with --embd_dim=128).
    (["--embd_dim=128"], r"--fpn_dim=512 differs from --embd_dim=128: the neck is the identity"),
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
    asl_flags.cli_parser("asl_tf.evaluate", {})(["prog", "--checkpont=runs/x"])
  assert str(e.value).startswith("asl_tf.evaluate: Unknown command line flag 'checkpont'")
  assert "checkpoint" in str(e.value)


TOOLS = ("asl_tf.train", "asl_tf.evaluate", "asl_tf.infer", "asl_tf.visualize", "asl_tf.export",
         "asl_tf.tools.import_torch")


@pytest.mark.parametrize("tool", TOOLS)
def test_each_tools_help_lists_its_own_flags_and_exits_0(tool, capsys):
  groups = importlib.import_module(tool).HELP_GROUPS
  with pytest.raises(SystemExit) as e:
    asl_flags.cli_parser(tool, groups)(["prog", "--help"])
  assert e.value.code == 0
  out = capsys.readouterr().out
  listed = {line.split()[0].split("=")[0] for line in out.splitlines()
            if line.startswith("  --")}
  want = {f"--{n}" for names in groups.values() for n in names}
  assert listed == want and len(out.splitlines()) <= 70
  assert "--helpfull" in out


def test_every_config_field_has_one_flag_with_its_default_type_and_help():
  """The flags are generated from the dataclasses: parsing no flag gives the dataclass defaults
  (paths aside: flags make them absolute), each flag's help is its field's docstring entry, and a
  value given on the command line reaches its field with the field's type."""
  absl_flags = asl_flags.FLAGS
  absl_flags.unparse_flags()
  try:
    asl_flags.parse_argv(["test"])
    from_flags = asl_flags.build_config(check=False)
  finally:
    absl_flags.unparse_flags()
  defaults, seen = config_lib.Config(), set()
  for section in dataclasses.fields(config_lib.Config):
    helps = config_lib.field_help(section.default_factory)
    flagged, default = getattr(from_flags, section.name), getattr(defaults, section.name)
    for name, value in vars(default).items():
      flag = config_lib.flag_name(section.name, name)
      assert flag in absl_flags and helps.get(name), f"{section.name}.{name}"
      if flag not in seen:  # a flag shared by two sections has the first one's help
        assert absl_flags[flag].help.endswith(helps[name]), flag
      seen.add(flag)
      if name in ("output_dir", "export_dir"):
        assert getattr(flagged, name) == os.path.abspath(value), name
      else:
        assert getattr(flagged, name) == value, f"{section.name}.{name}"
  cfg = _parse(["--scale_factor=4", "--backbone_arch=2,2,2", "--mha_win_size=-1",
                "--regression_range=0,4,4,8,8,1e4", "--crop_ratio=0.5,1", "--eval_batch_size=3",
                "--focal_gamma=1.5", "--head_with_ln=false", "--max_seq_len=2304"])
  assert cfg.model.scale_factor == 4 and cfg.model.backbone_arch == (2, 2, 2)
  assert cfg.model.mha_win_size == (-1, -1, -1)
  assert cfg.model.regression_range == ((0.0, 4.0), (4.0, 8.0), (8.0, 10000.0))
  assert cfg.data.crop_ratio == (0.5, 1.0) and cfg.eval.batch_size == 3
  assert cfg.loss.focal_gamma == 1.5 and cfg.model.head_with_ln is False
  # The default window stands for every level, however many there are.
  cfg = _parse(["--backbone_arch=2,2,2", "--regression_range=0,4,4,8,8,1e4"])
  assert cfg.model.mha_win_size == (19, 19, 19)
  assert asl_flags.FLAGS["mha_win_size"].default == ["19"]


def test_field_help_reads_each_attribute_and_its_continuation_lines():
  section = type("Section", (), {"__doc__": (
      "A section.\n\n  Attributes:\n    alpha: first line,\n      continued.\n"
      "    beta: `b` (x).\n  ")})
  assert config_lib.field_help(section) == {"alpha": "first line, continued.",
                                            "beta": "`b` (x)."}
  assert asl_flags.first_sentence("a (b). C d. E") == "a (b)."
  assert asl_flags.first_sentence("no end") == "no end."


def test_a_config_saved_with_a_removed_field_loads():
  old = config_lib.Config().to_dict()
  old["model"]["max_buffer_len_factor"] = 6.0  # saved by earlier versions; never used
  assert config_lib.Config.from_dict(old) == config_lib.Config()


def test_a_config_saved_before_normalisation_existed_keeps_its_behaviour():
  """Runs saved without `sensitivity_normalization` (or `evaluator_loss`, `adamw_form`) trained
  without it (with MSE, Keras' Adam): loading (to evaluate or resume) must not switch today's
  default on; a section saved with it keeps its value."""
  old = config_lib.Config().to_dict()
  del old["loss"]["sensitivity_normalization"]
  del old["loss"]["evaluator_loss"]
  del old["train"]["adamw_form"]
  assert config_lib.Config.from_dict(old).loss.sensitivity_normalization == "none"
  assert config_lib.Config.from_dict(old).loss.evaluator_loss == "mse"
  assert config_lib.Config.from_dict(old).train.adamw_form == "keras"  # resumes with Keras' Adam
  assert config_lib.Config().train.adamw_form == "pytorch"
  assert config_lib.Config().loss.evaluator_loss == "bce"
  assert config_lib.Config.from_dict(config_lib.Config().to_dict()) == config_lib.Config()
  assert config_lib.Config.from_dict({}).loss.sensitivity_normalization == "instance"

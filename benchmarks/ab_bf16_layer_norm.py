"""In-process A/B of the bfloat16 inference LayerNorm: one detector whose norms take bfloat16
into the oneDNN pattern, one with the cast to float32 in front patched back in (which the
remapper leaves unfused), same weights, forward passes alternating call by call (the order
reversed every other round).

  python benchmarks/ab_bf16_layer_norm.py [--config=thumos] [--repeats=20]

Both run `--inference_precision=mixed_bfloat16 --kernel_policy=fast` on one video of T random
features (the config's first length), as `benchmarks/inference.py` does. Never run it beside
other work. `max_abs_logit_difference` compares the two forms' class logits;
`layer_norm_pattern_dtypes` names the input dtypes of each form's FusedBatchNorm patterns.
"""

import dataclasses
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # pylint: disable=g-import-not-at-top,wrong-import-position
import inference as inference_benchmark  # pylint: disable=g-import-not-at-top,wrong-import-position


def main():
  parser = common.benchmark_parser(__doc__.splitlines()[0], default_repeats=20)
  parser.add_argument("--config", default="", help=f"one of {sorted(inference_benchmark.CONFIGS)}"
                      "; default thumos (quick with --quick)")
  args = parser.parse_args()
  run = common.run_start()  # before anything is built or timed
  import numpy as np  # pylint: disable=g-import-not-at-top
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from asl_tf import inference  # pylint: disable=g-import-not-at-top
  from asl_tf.modeling import kernels  # pylint: disable=g-import-not-at-top

  name = args.config or ("quick" if args.quick else "thumos")
  config = inference_benchmark._config(name, "mixed_bfloat16")  # pylint: disable=protected-access
  mc, dc = config.model, config.data
  length = inference_benchmark.CONFIGS[name][1][0]
  raw = np.random.default_rng(length).normal(size=[length, mc.input_dim]).astype(np.float32)
  feats, mask = inference.features_for_inference(raw, dc.max_seq_len, mc.max_div_factor)
  feats, mask = tf.constant(feats), tf.constant(mask)
  bf16_pattern = kernels.layer_norm

  def cast_first(x, *a, **k):
    return bf16_pattern(tf.cast(x, tf.float32), *a, **k)

  forwards, pattern_dtypes, weights = {}, {}, None
  try:
    for variant, norm in (("cast_to_float32_first", cast_first),
                          ("bfloat16_pattern", bf16_pattern)):
      kernels.layer_norm = norm  # the forward is traced by its first call, with this form
      tf.keras.utils.set_random_seed(0)
      model = inference.build_detector(dataclasses.replace(
          config, model=dataclasses.replace(mc, kernel_policy="fast")))
      if weights is None:
        weights = model.get_weights()
      model.set_weights(weights)
      forward = common.forward_function(model, mc.input_dim)
      for _ in range(2):
        forward(feats, mask)["cls_logits"].numpy()
      forwards[variant] = forward
      graph = forward.get_concrete_function().graph
      pattern_dtypes[variant] = sorted({op.get_attr("T").name for op in graph.get_operations()
                                        if op.type == "FusedBatchNormV3"})
  finally:
    kernels.layer_norm = bf16_pattern
  # One untimed round: a variant's first call after the other was traced is slow.
  times, _ = common.alternating_rounds(
      {variant: lambda forward=forward: forward(feats, mask)["cls_logits"].numpy()
       for variant, forward in forwards.items()}, 2 if args.quick else args.repeats)
  logits = [forward(feats, mask)["cls_logits"].numpy().astype(np.float32)
            for forward in forwards.values()]
  common.emit({"benchmark": "ab_bf16_layer_norm", "command": " ".join(["python"] + sys.argv),
               "run": run,
               "config": name, "num_frames": length, "machine": common.machine_info(),
               "max_abs_logit_difference": float(np.abs(logits[0] - logits[1]).max()),
               "layer_norm_pattern_dtypes": pattern_dtypes,
               "results": common.ab_results(times, "cast_to_float32_first",
                                            "forward_median_sec", "calls_sec")}, args.output)


if __name__ == "__main__":
  main()

"""In-process A/B: training step and inference forward of several variants, alternating rounds.

Every variant's detector is built in this one process (with `--compare=kernel_policy`, `dtype`
or `optimizer` all with the first variant's weights), its `train_step` and forward traced and
warmed up; then each round times every variant in turn (`--steps` steps each; one untimed round
first), so that drifts of the machine (other load, frequency) hit all variants alike. Reports the
median over `--repeats` rounds and the ratio to the first variant, with the CPU's model and flags
(`avx512*`, `amx*`). Never run it beside other work. The optimizer's form follows the kernel
policy (Keras' AdamW under `reference`, else FusedAdamW), so `--compare=kernel_policy` and the
`bfloat16_reference` variant time it too; `--compare=optimizer` isolates it.

  python benchmarks/ab_step.py --compare=kernel_policy            # reference vs fast vs portable
  python benchmarks/ab_step.py --compare=asl                      # ActionFormer vs ASL defaults
  python benchmarks/ab_step.py --compare=asl --config=thumos_i3d --repeats=5
  python benchmarks/ab_step.py --compare=dtype                    # float32 vs bfloat16
  python benchmarks/ab_step.py --compare=optimizer                # Keras AdamW vs FusedAdamW
"""

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # pylint: disable=g-import-not-at-top,wrong-import-position
import train_step  # pylint: disable=g-import-not-at-top,wrong-import-position

COMPARISONS = {
    "kernel_policy": {"reference": ("--kernel_policy=reference",),
                      "fast": ("--kernel_policy=fast",),
                      "portable": ("--kernel_policy=portable",)},
    "asl": {"actionformer": train_step.VARIANT_FLAGS["actionformer"],
            "asl_default": (),
            # The class level on top (the authors' part; off by default since the ablation).
            "asl_class_level": ("--class_sensitivity",),
            # The evaluator's depth before the depth search made it 0.
            "asl_evaluator_2_layers": ("--evaluator_layers=2",),
            "asl_no_contrastive": ("--contrastive_weight=0",),
            "asl_contrastive_topk": ("--contrastive_weight=0.1",
                                     "--contrastive_sampling=sensitivity_topk")},
    # The compute dtype (Keras policy: bfloat16 layers, float32 variables, losses and logits).
    "dtype": {"float32": ("--mixed_precision=float32", "--kernel_policy=fast"),
              "bfloat16_fast": ("--mixed_precision=mixed_bfloat16", "--kernel_policy=fast"),
              "bfloat16_reference": ("--mixed_precision=mixed_bfloat16",
                                     "--kernel_policy=reference")},
    # The optimizer's form (`reference`: Keras' AdamW; else FusedAdamW), the model under `fast`.
    "optimizer": {"keras_adamw": ("--kernel_policy=fast",),
                  "fused_adamw": ("--kernel_policy=fast",)},
}


def variant_flags(compare):
  """{variant: flags} of a comparison, each starting from the default model (the class level
  off whatever the flagfile says); a variant's own flags come after and win."""
  return {name: train_step.DEFAULT_ASL + flags for name, flags in COMPARISONS[compare].items()}


def main():
  parser = common.benchmark_parser(__doc__.splitlines()[0], default_repeats=8)
  parser.add_argument("--compare", default="kernel_policy", choices=sorted(COMPARISONS))
  parser.add_argument("--config", default="bench", help="flagfile name in configs/")
  parser.add_argument("--steps", type=int, default=5, help="steps per variant and round")
  args = parser.parse_args()
  run = common.run_start()  # before anything is built or timed
  rounds = 2 if args.quick else args.repeats

  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from asl_tf import flags as asl_flags  # pylint: disable=g-import-not-at-top

  variants = variant_flags(args.compare)
  runs, weights = {}, None
  for name, extra in variants.items():
    asl_flags.FLAGS.unparse_flags()
    tf.keras.utils.set_random_seed(0)
    # epoch 5: every ASL part is on (the evaluator may start later than epoch 0).
    setup = train_step.build_step(args.config, args.quick, False, extra, weights=weights,
                                  epoch=5,
                                  optimizer_kernel_policy=(
                                      train_step.OPTIMIZER_FORMS.get(name)
                                      if args.compare == "optimizer" else None))
    if args.compare in ("kernel_policy", "dtype", "optimizer"):
      weights = weights or setup.model.get_weights()
    forward = common.forward_function(setup.model, setup.config.model.input_dim)
    for _ in range(3):
      setup.run()
      forward(setup.batch["features"], setup.batch["padding_mask"])
    runs[name] = (setup.step, forward, setup.batch, setup.epoch)

  times = {name: {"train_step": [], "forward": []} for name in runs}
  # Round 0 is warm-up: a variant's first calls after other variants were built are slow.
  for round_index in range(rounds + 1):
    for name, (step, forward, batch, epoch) in runs.items():
      start = time.perf_counter()
      for _ in range(args.steps):
        out = step(batch, epoch)
      float(out["total_loss"])
      step_sec = (time.perf_counter() - start) / args.steps
      start = time.perf_counter()
      for _ in range(args.steps):
        outputs = forward(batch["features"], batch["padding_mask"])
      outputs["cls_logits"].numpy()
      if round_index:
        times[name]["train_step"].append(step_sec)
        times[name]["forward"].append((time.perf_counter() - start) / args.steps)
  first = next(iter(runs))
  results = {name: {} for name in times}
  for what in times[first]:
    for name, timed in common.ab_results({n: m[what] for n, m in times.items()}, first,
                                         "median_sec", "rounds_sec", digits=5).items():
      results[name][what] = timed
  common.emit({"benchmark": "ab_step", "command": " ".join(["python"] + sys.argv),
               "run": run,
               "compare": args.compare, "config": args.config, "variants": variants,
               "machine": common.machine_info(),
               "results": results}, args.output)


if __name__ == "__main__":
  main()

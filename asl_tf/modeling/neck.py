"""ActionFormer's identity neck (`FPNIdentity`): a LayerNorm per pyramid level."""

import keras

from asl_tf.modeling import layers


@keras.saving.register_keras_serializable(package="asl_tf")
class IdentityNeck(keras.layers.Layer):
  """Applies a LayerNorm (or nothing) to each pyramid level; masks pass through unchanged.

  Inputs: `level_features` list of [B, T_l, C], `level_masks` list of [B, T_l] bool.
  Outputs: `(list of [B, T_l, C], list of [B, T_l] bool)`.

  Args:
    num_levels: pyramid levels.
    with_ln: apply a per-level LayerNorm (ActionFormer `fpn_with_ln`).
    kernel_policy: `kernels.POLICIES` entry of the LayerNorms.
  """

  def __init__(self, num_levels, with_ln=True, kernel_policy="auto", **kwargs):
    super().__init__(**kwargs)
    self.num_levels = num_levels
    self.with_ln = with_ln
    self.kernel_policy = kernel_policy
    self.norms = [layers.ChannelLayerNorm(kernel_policy=kernel_policy, name=f"norm_{l}",
                                          dtype=self.dtype_policy)
                  for l in range(num_levels)] if with_ln else []

  def build(self, input_shape):
    for norm, shape in zip(self.norms, input_shape):
      norm.build(shape)

  def call(self, level_features, level_masks):
    if len(level_features) != self.num_levels or len(level_masks) != self.num_levels:
      raise ValueError(f"IdentityNeck was built for {self.num_levels} levels but got "
                       f"{len(level_features)} features and {len(level_masks)} masks")
    if self.with_ln:
      level_features = [norm(x) for norm, x in zip(self.norms, level_features)]
    return list(level_features), [layers.as_bool_mask(m) for m in level_masks]

  def get_config(self):
    config = super().get_config()
    config.update({"num_levels": self.num_levels, "with_ln": self.with_ln,
                   "kernel_policy": self.kernel_policy})
    return config

"""Every layer of asl_tf.modeling through the shared checks of layer_harness."""

import pytest

from asl_tf.modeling import attention
from asl_tf.modeling import backbone
from asl_tf.modeling import heads
from asl_tf.modeling import layers
from asl_tf.modeling import neck
from asl_tf.modeling import sensitivity
import layer_harness

LAYERS = [
    layers.MaskedConv1D(4, 3, strides=2, groups=2, use_bias=False, bias_initializer="ones",
                        kernel_policy="reference"),
    layers.ChannelLayerNorm(epsilon=1e-3, kernel_policy="portable"),
    layers.Pointwise(6, kernel_policy="portable"),
    layers.Scale(init_value=0.5),
    layers.LayerScale(7, init_value=0.1),
    layers.DropPath(0.3),
    attention.MaskedSelfAttention(8, 2, 7, stride=2, dropout=0.1, kernel_policy="fast"),
    attention.TransformerBlock(8, 2, -1, stride=2, dropout=0.1, droppath=0.2),
    backbone.ConvTransformerBackbone(6, 8, 2, max_seq_len=32, arch=(2, 1, 3),
                                     mha_win_size=(5, 5, 3, -1), use_abs_pe=True,
                                     stream_dims=(2, 4), stream_proj_dims=(4, 4), dropout=0.1,
                                     kernel_policy="reference"),
    neck.IdentityNeck(4, with_ln=False),
    heads.ClassificationHead(5, 16, num_layers=2, kernel_size=5, with_ln=False, prior_prob=0.1,
                             empty_classes=(1, 3), kernel_policy="portable"),
    heads.RegressionHead(4, 16, num_layers=3, kernel_size=3, with_ln=True),
    sensitivity.ClassSensitivity(3, parametrization="stable", lr_scale=10.0, sigma_floor=0.2),
    sensitivity.InstanceEvaluator(16, num_layers=1, kernel_size=5, kernel_policy="reference",
                                  feature_gradient=True),
    sensitivity.ContrastiveProjection(0),
    sensitivity.ActionSensitivityEvaluator(4, 16, class_sensitivity=False,
                                           sensitivity_parametrization="stable",
                                           evaluator_layers=3, contrastive_proj_dim=32,
                                           sensitivity_sigma_floor=0.3, kernel_policy="fast",
                                           evaluator_feature_gradient=True),
]


@pytest.mark.parametrize("layer", LAYERS, ids=lambda layer: type(layer).__name__)
def test_config_round_trip(layer):
  layer_harness.assert_config_round_trip(layer)

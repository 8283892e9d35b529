"""Checks every asl_tf layer must pass (keras-hub style), shared by the layer tests."""

import inspect

import keras
import numpy as np
import tensorflow as tf

# Init arguments every Keras layer takes, not the layer's own.
_BASE_ARGS = {"self", "kwargs", "name", "dtype", "trainable", "autocast", "input_dim_unused"}


def assert_config_round_trip(layer):
  """`get_config` names every init argument, each stored as an attribute of the same name with
  the value the config holds; `from_config` and Keras (de)serialization give the same config."""
  config = layer.get_config()
  params = set(inspect.signature(type(layer).__init__).parameters) - _BASE_ARGS
  missing = sorted(params - set(config))
  assert not missing, f"{type(layer).__name__}.get_config() lacks init arguments {missing}"
  for name in params:
    value = getattr(layer, name, None)
    if isinstance(value, keras.initializers.Initializer):
      value = keras.initializers.serialize(value)
    if isinstance(value, tuple):
      value = list(value)
    want = list(config[name]) if isinstance(config[name], tuple) else config[name]
    assert value == want, f"{type(layer).__name__}.{name} = {value!r}, config {want!r}"
  assert type(layer).from_config(config).get_config() == config
  restored = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(layer))
  assert type(restored) is type(layer)
  assert restored.get_config() == config


def assert_mixed_precision_close(make, call, atol, output_dtype=tf.float16):
  """`make(dtype)` builds the layer; `call(layer)` runs it and returns a tensor or a list of
  them. Under mixed_float16 with the float32 layer's weights: outputs in `output_dtype`, weights
  float32, values within `atol` of float32."""
  f32 = make(None)
  want = call(f32)
  f16 = make("mixed_float16")
  call(f16)
  f16.set_weights(f32.get_weights())
  got = call(f16)
  want = want if isinstance(want, (list, tuple)) else [want]
  got = got if isinstance(got, (list, tuple)) else [got]
  assert all(w.dtype == "float32" for w in f16.trainable_weights)
  for g, w in zip(got, want):
    assert g.dtype == output_dtype
    np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(w), atol=atol)


def traced_nodes(concrete_function):
  """Every NodeDef of a traced function, its nested functions (`tf.cond` branches, gradients)
  included; a branch also rewritten for its gradient counts twice."""
  graph_def = concrete_function.graph.as_graph_def()
  return list(graph_def.node) + [n for f in graph_def.library.function for n in f.node_def]

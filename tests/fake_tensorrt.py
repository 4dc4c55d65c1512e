"""A stand-in ``tensorrt`` module for the build tests: TensorRT cannot be installed here (its wheels come from the
vendor's index only), so ``export.trt.build_engine`` is driven on this fake, which records what it was asked."""

from __future__ import annotations

import types

__all__ = ["STRONGLY_TYPED_BIT", "BuildLog", "fake_tensorrt"]

STRONGLY_TYPED_BIT = 1  # TensorRT 10's NetworkDefinitionCreationFlag.STRONGLY_TYPED


class BuildLog:
    """What build_engine asked of the stand-in TensorRT."""

    def __init__(self):
        self.network_flags = None
        self.set_flags: set[str] = set()
        self.cleared_flags: set[str] = set()
        self.pool_limits: dict[str, int] = {}
        self.profile: dict[str, tuple] = {}
        self.cache_data = None
        self.ignore_mismatch = None
        self.plugins_to_serialize = None
        self.flags: set[str] | None = None  # the config's flags when the engine was built (TF32 is on by default)


def fake_tensorrt(version: str, recorder: BuildLog, inputs: dict[str, tuple]) -> types.ModuleType:
    """A tensorrt module whose builder records its settings and 'builds' the bytes b"engine"; its network has
    ``inputs`` ({name: shape}, -1 dynamic) as the ONNX parser would give them."""

    class Logger:
        WARNING = "warning"

        def __init__(self, level):
            self.level = level

    class Network:
        num_layers = 0

        def __init__(self):
            self.inputs = []
            for name, shape in inputs.items():
                tensor = types.SimpleNamespace(name=name, shape=shape, dtype="f32")
                self.inputs.append(tensor)
            self.num_inputs = len(self.inputs)

        def get_input(self, i):
            return self.inputs[i]

    class Cache:
        def __init__(self, data):
            self.data = data

        def serialize(self):
            return b"tuned after " + self.data

    class Config:
        def __init__(self):
            self.cache = None
            self.flags = {"TF32"}  # TensorRT's default

        def set_memory_pool_limit(self, pool, size):
            recorder.pool_limits[pool] = size

        def set_flag(self, flag):
            self.flags.add(flag)
            recorder.set_flags.add(flag)

        def clear_flag(self, flag):
            self.flags.discard(flag)
            recorder.cleared_flags.add(flag)

        @property
        def plugins_to_serialize(self):
            return recorder.plugins_to_serialize

        @plugins_to_serialize.setter
        def plugins_to_serialize(self, libraries):
            recorder.plugins_to_serialize = list(libraries)

        def add_optimization_profile(self, profile):
            recorder.profile = dict(profile.shapes)

        def create_timing_cache(self, data):
            recorder.cache_data = bytes(data)
            return Cache(bytes(data))

        def set_timing_cache(self, cache, ignore_mismatch):
            recorder.ignore_mismatch = ignore_mismatch
            self.cache = cache
            return True

        def get_timing_cache(self):
            return self.cache

    class Profile:
        def __init__(self):
            self.shapes = {}

        def set_shape(self, name, low, opt, high):
            self.shapes[name] = (low, opt, high)

    class Builder:
        def __init__(self, logger):
            self.logger = logger

        def create_network(self, flags):
            recorder.network_flags = flags
            return Network()

        def create_builder_config(self):
            return Config()

        def create_optimization_profile(self):
            return Profile()

        def build_serialized_network(self, network, config):
            recorder.flags = set(config.flags)
            return b"engine"

    class OnnxParser:
        num_errors = 0

        def __init__(self, network, logger):
            pass

        def parse(self, graph, path):
            return True

        def get_used_vc_plugin_libraries(self):
            return ["libnvinfer_vc_plugin.so.10"]

    module = types.ModuleType("tensorrt")
    module.__version__ = version
    module.Logger, module.Builder, module.OnnxParser = Logger, Builder, OnnxParser
    module.init_libnvinfer_plugins = lambda logger, namespace: True
    module.NetworkDefinitionCreationFlag = types.SimpleNamespace(STRONGLY_TYPED=STRONGLY_TYPED_BIT)
    module.BuilderFlag = types.SimpleNamespace(TF32="TF32", FP16="FP16", OBEY_PRECISION_CONSTRAINTS="OBEY",
                                               VERSION_COMPATIBLE="VERSION_COMPATIBLE")
    module.MemoryPoolType = types.SimpleNamespace(WORKSPACE="WORKSPACE")
    module.Dims = lambda dims: tuple(dims)
    module.float32, module.float16 = "f32", "f16"
    return module

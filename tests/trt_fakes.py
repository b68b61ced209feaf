"""Fake ``tensorrt``, ``pycuda.driver`` and ``libcuda`` (graph API) modules for testing the TensorRT backend and
builder without a GPU: device memory is numpy bytes addressed by integers, an "engine" is the ONNX graph (run
with ONNX Runtime) plus its profile, and every API call that matters is recorded."""

from __future__ import annotations

import pickle
import types
from collections import Counter
from typing import Any, Dict, List, Tuple

import numpy as np
import onnx
import onnxruntime as ort

MAGIC = b"FAKE-TRT-ENGINE\0"


class FakeCuda:
    """pycuda.driver: device memory is a dict of numpy byte arrays; copies are recorded."""

    def __init__(self) -> None:
        self.memory: Dict[int, np.ndarray] = {}
        self.next_address = 0x10000
        self.htod: List[Tuple[int, int]] = []  # (address, nbytes)
        self.dtoh: List[Tuple[int, int]] = []
        self.freed = 0
        self.contexts: List[str] = []
        self.capturing: Any = None  # a list collecting captured work while a stream is capturing
        self.syncs = 0

    def init(self) -> None:
        pass

    def Device(self, index: int) -> Any:  # noqa: N802 (pycuda's name)
        cuda = self

        class Context:
            def push(self) -> None:
                cuda.contexts.append("push")

            def pop(self) -> None:
                cuda.contexts.append("pop")

        return types.SimpleNamespace(name=lambda: "Fake GPU", retain_primary_context=Context)

    def Stream(self) -> Any:  # noqa: N802
        cuda = self

        class Stream:
            handle = 0xABC

            def synchronize(self) -> None:
                cuda.syncs += 1

        return Stream()

    def mem_alloc(self, nbytes: int) -> Any:
        cuda = self
        address = self.next_address
        self.next_address += (int(nbytes) + 0xFFF) // 0x1000 * 0x1000 + 0x1000
        self.memory[address] = np.zeros(int(nbytes), np.uint8)

        class Allocation:
            def __int__(self) -> int:
                return address

            def free(self) -> None:
                cuda.freed += 1
                cuda.memory.pop(address, None)

        return Allocation()

    def pagelocked_empty(self, shape: Any, dtype: Any) -> np.ndarray:
        return np.empty(shape, dtype)

    def bytes_at(self, ptr: int, nbytes: int) -> np.ndarray:
        for base, mem in self.memory.items():
            if base <= ptr and ptr + nbytes <= base + mem.size:
                return mem[ptr - base : ptr - base + nbytes]
        raise AssertionError(f"no device allocation holds {nbytes} bytes at {ptr:#x}")

    def read(self, ptr: int, shape: Tuple[int, ...], dtype: Any) -> np.ndarray:
        dtype = np.dtype(dtype)
        return self.bytes_at(ptr, int(np.prod(shape)) * dtype.itemsize).view(dtype).reshape(shape).copy()

    def write(self, ptr: int, array: np.ndarray) -> None:
        array = np.ascontiguousarray(array)
        self.bytes_at(ptr, array.nbytes)[...] = array.reshape(-1).view(np.uint8)

    def memcpy_htod_async(self, dst: Any, src: np.ndarray, stream: Any = None) -> None:
        assert src.flags.c_contiguous
        self.htod.append((int(dst), src.nbytes))
        self.write(int(dst), src)

    def memcpy_dtoh_async(self, dst: np.ndarray, src: Any, stream: Any = None) -> None:
        assert dst.flags.c_contiguous
        self.dtoh.append((int(src), dst.nbytes))
        dst.reshape(-1).view(np.uint8)[...] = self.bytes_at(int(src), dst.nbytes)

    def memcpy_htod(self, dst: Any, src: np.ndarray) -> None:
        self.memcpy_htod_async(dst, src)


class FakeGraphLib:
    """The four libcuda graph calls (ctypes-style arguments): capture collects the engines' enqueued work."""

    def __init__(self, cuda: FakeCuda) -> None:
        self.cuda = cuda
        self.graphs: Dict[int, List[Any]] = {}
        self.launches = 0
        self.destroyed = 0

    def cuStreamBeginCapture_v2(self, stream: Any, mode: Any) -> int:  # noqa: N802
        assert self.cuda.capturing is None and stream.value == 0xABC and mode.value == 1
        self.cuda.capturing = []
        return 0

    def cuStreamEndCapture(self, stream: Any, graph_ref: Any) -> int:  # noqa: N802
        work, self.cuda.capturing = self.cuda.capturing, None
        graph_id = 0x100 + len(self.graphs)
        self.graphs[graph_id] = work
        graph_ref._obj.value = graph_id
        return 0

    def cuGraphInstantiateWithFlags(self, exec_ref: Any, graph: Any, flags: Any) -> int:  # noqa: N802
        exec_ref._obj.value = graph.value + 0x1000
        return 0

    def cuGraphLaunch(self, graph_exec: Any, stream: Any) -> int:  # noqa: N802
        self.launches += 1
        for work in self.graphs[graph_exec.value - 0x1000]:
            work()
        return 0

    def cuGraphExecDestroy(self, graph_exec: Any) -> int:  # noqa: N802
        self.destroyed += 1
        return 0

    def cuGraphDestroy(self, graph: Any) -> int:  # noqa: N802
        return 0


_NP = {1: np.float32, 7: np.int64, 6: np.int32, 10: np.float16}


class DataType:
    def __init__(self, name: str, np_type: Any) -> None:
        self.name, self.np_type = name, np.dtype(np_type)


DTYPES = {np.dtype(np.float32): DataType("FLOAT", np.float32), np.dtype(np.int64): DataType("INT64", np.int64),
          np.dtype(np.int32): DataType("INT32", np.int32), np.dtype(np.float16): DataType("HALF", np.float16)}


def engine_blob(onnx_bytes: bytes, max_batch: int, flags: Any = (), noise: float = 0.0) -> bytes:
    return MAGIC + pickle.dumps({"onnx": onnx_bytes, "max_batch": int(max_batch), "flags": sorted(flags),
                                 "noise": float(noise)})


def read_blob(data: bytes) -> Dict[str, Any]:
    assert data.startswith(MAGIC)
    return pickle.loads(data[len(MAGIC):])


def make_fake_trt(cuda: FakeCuda, version: str = "10.3.0", fast_fp16: bool = True, fail_parse: bool = False,
                  fail_build: bool = False) -> Any:
    """A ``tensorrt`` module: Builder/OnnxParser (build_engine's calls), Runtime -> engine -> context (the
    runtime's calls), the calls counted in ``trt.calls`` and per context in ``context.calls`` ((call, tensor))."""
    trt = types.SimpleNamespace(__version__=version, calls=Counter(), contexts=[], builders=[])
    trt.TensorIOMode = types.SimpleNamespace(INPUT="INPUT", OUTPUT="OUTPUT")
    trt.nptype = lambda dt: dt.np_type
    trt.Logger = type("Logger", (), {"WARNING": 2, "__init__": lambda self, level=2: None})
    trt.NetworkDefinitionCreationFlag = types.SimpleNamespace(EXPLICIT_BATCH=0)
    trt.MemoryPoolType = types.SimpleNamespace(WORKSPACE="WORKSPACE")
    trt.BuilderFlag = types.SimpleNamespace(FP16="FP16", INT8="INT8")
    trt.IInt8EntropyCalibrator2 = type("IInt8EntropyCalibrator2", (), {"__init__": lambda self: None})

    class Tensor:
        def __init__(self, value: Any) -> None:
            t = value.type.tensor_type
            self.name = value.name
            self.shape = tuple(-1 if d.dim_param or d.dim_value == 0 else d.dim_value for d in t.shape.dim)
            self.dtype = DTYPES[np.dtype(_NP[t.elem_type])]

    class Network:
        def __init__(self, flags: int) -> None:
            self.flags, self.inputs, self.outputs, self.onnx = flags, [], [], b""

        num_inputs = property(lambda self: len(self.inputs))
        num_outputs = property(lambda self: len(self.outputs))

        def get_input(self, i: int) -> Tensor:
            return self.inputs[i]

        def get_output(self, i: int) -> Tensor:
            return self.outputs[i]

    class Profile:
        def __init__(self) -> None:
            self.shapes: Dict[str, Tuple[Tuple[int, ...], ...]] = {}

        def set_shape(self, name: str, lo: Any, opt: Any, hi: Any) -> None:
            self.shapes[name] = (tuple(lo), tuple(opt), tuple(hi))

    class Config:
        def __init__(self) -> None:
            self.flags, self.profiles, self.int8_calibrator, self.pools = set(), [], None, {}

        def set_memory_pool_limit(self, pool: Any, size: int) -> None:
            self.pools[pool] = size

        def set_flag(self, flag: str) -> None:
            self.flags.add(flag)

        def add_optimization_profile(self, profile: Profile) -> int:
            self.profiles.append(profile)
            return len(self.profiles) - 1

        def set_calibration_profile(self, profile: Profile) -> None:
            pass

    class Builder:
        platform_has_fast_fp16 = fast_fp16
        platform_has_fast_int8 = True

        def __init__(self, logger: Any) -> None:
            trt.builders.append(self)

        def create_network(self, flags: int) -> Network:
            self.network = Network(flags)
            return self.network

        def create_builder_config(self) -> Config:
            self.config = Config()
            return self.config

        def create_optimization_profile(self) -> Profile:
            return Profile()

        def build_serialized_network(self, network: Network, config: Config) -> Any:
            if fail_build:
                return None
            cal = config.int8_calibrator
            if cal is not None:
                names = [t.name for t in network.inputs]
                while cal.get_batch(names) is not None:
                    pass
            (profile,) = config.profiles
            top = min(hi[0] for _lo, _opt, hi in profile.shapes.values())
            return bytearray(engine_blob(network.onnx, top, config.flags))

    class OnnxParser:
        def __init__(self, network: Network, logger: Any) -> None:
            self.network, self.errors = network, []

        num_errors = property(lambda self: len(self.errors))

        def get_error(self, i: int) -> Any:
            return self.errors[i]

        def parse(self, data: bytes) -> bool:
            if fail_parse:
                self.errors = [types.SimpleNamespace(desc=lambda: "In node 3 (importFoo): UNSUPPORTED_NODE: Foo")]
                return False
            model = onnx.load_from_string(data)
            self.network.onnx = bytes(data)
            self.network.inputs = [Tensor(v) for v in model.graph.input]
            self.network.outputs = [Tensor(v) for v in model.graph.output]
            return True

    class Context:
        def __init__(self, engine: "Engine") -> None:
            self.engine, self.shapes, self.addresses, self.calls = engine, {}, {}, Counter()
            trt.contexts.append(self)

        def _count(self, call: str, name: str = "") -> None:
            self.calls[(call, name)] += 1
            trt.calls[call] += 1

        def set_input_shape(self, name: str, shape: Any) -> bool:
            self._count("set_input_shape", name)
            shape = tuple(int(d) for d in shape)
            if not 1 <= shape[0] <= self.engine.max_batch or shape[1:] != self.engine.shapes[name][1:]:
                return False
            self.shapes[name] = shape
            return True

        def get_tensor_shape(self, name: str) -> Tuple[int, ...]:
            if name in self.engine.inputs:
                return self.shapes.get(name, self.engine.shapes[name])
            batch = self.shapes[self.engine.inputs[0]][0]
            return (batch, *self.engine.shapes[name][1:])

        def set_tensor_address(self, name: str, ptr: int) -> bool:
            self._count("set_tensor_address", name)
            self.addresses[name] = int(ptr)
            return True

        def execute_async_v3(self, stream_handle: int) -> bool:
            assert stream_handle == 0xABC
            self._count("execute_async_v3")
            # the pointers and shapes are read at enqueue time, as the GPU kernels capture them
            shapes, addresses = dict(self.shapes), dict(self.addresses)
            work = lambda: self.engine.execute(shapes, addresses)  # noqa: E731
            if cuda.capturing is not None:
                cuda.capturing.append(work)
            else:
                work()
            return True

    class Engine:
        def __init__(self, blob: Dict[str, Any]) -> None:
            self.session = ort.InferenceSession(blob["onnx"], providers=["CPUExecutionProvider"])
            self.max_batch, self.noise = blob["max_batch"], blob["noise"]
            io = [*self.session.get_inputs(), *self.session.get_outputs()]
            self.inputs = [t.name for t in self.session.get_inputs()]
            self.names = [t.name for t in io]
            self.shapes = {t.name: tuple(d if isinstance(d, int) else -1 for d in t.shape) for t in io}
            kinds = {"tensor(float)": np.float32, "tensor(int64)": np.int64, "tensor(int32)": np.int32}
            self.dtypes = {t.name: DTYPES[np.dtype(kinds[t.type])] for t in io}
            if int(version.split(".")[0]) < 10:  # TensorRT 8.x has no int64 IO tensors: it returns int32
                self.dtypes = {n: DTYPES[np.dtype(np.int32)] if d.name == "INT64" else d for n, d in self.dtypes.items()}

        num_io_tensors = property(lambda self: len(self.names))

        def get_tensor_name(self, i: int) -> str:
            return self.names[i]

        def get_tensor_mode(self, name: str) -> str:
            return trt.TensorIOMode.INPUT if name in self.inputs else trt.TensorIOMode.OUTPUT

        def get_tensor_dtype(self, name: str) -> DataType:
            return self.dtypes[name]

        def get_tensor_shape(self, name: str) -> Tuple[int, ...]:
            return self.shapes[name]

        def get_tensor_profile_shape(self, name: str, profile: int) -> Tuple[Tuple[int, ...], ...]:
            rest = self.shapes[name][1:]
            return (1, *rest), (self.max_batch, *rest), (self.max_batch, *rest)

        def create_execution_context(self) -> Context:
            return Context(self)

        def execute(self, shapes: Dict[str, Tuple[int, ...]], addresses: Dict[str, int]) -> None:
            feeds = {n: cuda.read(addresses[n], shapes[n], self.dtypes[n].np_type) for n in self.inputs}
            outputs = [n for n in self.names if n not in self.inputs]
            for name, value in zip(outputs, self.session.run(outputs, feeds)):
                if self.noise and value.dtype.kind == "f":
                    value = value + np.float32(self.noise) * (1.0 + np.abs(value))
                if self.noise and name == "class":
                    value = (value + 1) % 3
                assert name in addresses, f"output {name} has no address"
                cuda.write(addresses[name], value.astype(self.dtypes[name].np_type))

    class Runtime:
        def __init__(self, logger: Any) -> None:
            pass

        def deserialize_cuda_engine(self, data: bytes) -> Any:
            if not bytes(data).startswith(MAGIC):
                return None
            return Engine(read_blob(bytes(data)))

    trt.Builder, trt.OnnxParser, trt.Runtime = Builder, OnnxParser, Runtime
    return trt

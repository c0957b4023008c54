"""Fuzzing the loader (issue 7): hypothesis-driven mutations of valid adapter files — raw bytes,
the JSON header, and the tensors themselves — loaded onto a model.

The property: `load_network` either returns a working network or raises one of our typed errors
(`AdapterError`), and after a refusal the model is bit-identical (weights and forward). A network
that loads must run forward and backward, merge (or refuse with `MergeError`), unmerge exactly and
remove itself, leaving the model as it was. No other exception may escape.

CI runs a bounded, derandomized number of cases per test (120, set by `FUZZ` below; a few seconds).
For a long run by hand, set the count, e.g.:

    LYCORIS_LIKE_FUZZ_EXAMPLES=20000 python -m pytest tests/test_fuzz.py -q

which also randomizes the seed (failures are saved in `.hypothesis/` and replayed first).
"""

from __future__ import annotations

import json
import struct
import warnings
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from safetensors.torch import save

from lycoris_like import AdapterError, MergeError, load_network

from conftest import search_settings
from test_hostile_files import ZOO_FILES, Snapshot, zoo, zoo_file, zoo_inputs  # noqa: F401 (fixtures)

pytestmark = pytest.mark.usefixtures("one_thread")

FUZZ = search_settings("LYCORIS_LIKE_FUZZ_EXAMPLES", ci_examples=120)

KINDS = sorted(ZOO_FILES)
_VALID = {kind: save(zoo_file(kind)) for kind in KINDS}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


def exercise_load(path: Path, strict: bool) -> str:
    """Load `path` onto a fresh model and check the property; returns what happened."""
    model = zoo()
    inputs = zoo_inputs()
    snap = Snapshot(model, inputs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            net = load_network(model, path, strict=strict)
        except AdapterError:
            snap.assert_untouched()
            return "refused"
    assert len(net) > 0
    for mode in ("auto", "rebuild", "bypass"):
        net.set_forward_mode(mode)
        with torch.no_grad():
            model(*inputs)
    net.set_forward_mode("auto")
    net.train()
    model.train()
    outputs = model(*inputs)
    sum(o.float().sum() for o in outputs).backward()
    net.eval()
    model.eval()
    net.set_multiplier(0.5)
    try:
        net.merge()
    except MergeError:
        assert not net.merged
    else:
        net.unmerge()
    net.file_state_dict()
    net.remove()
    snap.assert_untouched()
    return "loaded"


# ----------------------------------------------------------------------------- raw bytes


fractions = st.floats(0, 1, allow_nan=False)
byte_ops = st.one_of(
    st.tuples(st.just("flip"), fractions, st.integers(0, 7)),
    st.tuples(st.just("set"), fractions, st.integers(0, 255)),
    st.tuples(st.just("delete"), fractions, st.integers(1, 64)),
    st.tuples(st.just("insert"), fractions, st.binary(min_size=1, max_size=32)),
    st.tuples(st.just("truncate"), fractions),
    st.tuples(st.just("copy"), fractions, fractions, st.integers(1, 256)),
    st.tuples(st.just("length"), st.one_of(st.integers(0, 2**64 - 1), st.integers(-64, 64))),
)
# Most of the file is tensor data; aim half of the positions at the 8-byte length and the header.
regions = st.sampled_from(["anywhere", "header"])


def mutate_bytes(blob: bytes, ops: list[tuple], region: str) -> bytes:
    data = bytearray(blob)
    header_end = 8 + struct.unpack("<Q", blob[:8])[0]
    for op in ops:
        if not data:
            break
        scale = header_end if region == "header" else len(data)

        def pos(frac: float) -> int:
            return min(int(frac * scale), len(data) - 1)

        kind = op[0]
        if kind == "flip":
            data[pos(op[1])] ^= 1 << op[2]
        elif kind == "set":
            data[pos(op[1])] = op[2]
        elif kind == "delete":
            i = pos(op[1])
            del data[i:i + op[2]]
        elif kind == "insert":
            i = pos(op[1])
            data[i:i] = op[2]
        elif kind == "truncate":
            del data[pos(op[1]):]
        elif kind == "copy":
            i, j = pos(op[1]), pos(op[2])
            data[j:j] = data[i:i + op[3]]
        elif kind == "length":
            current = struct.unpack("<Q", bytes(data[:8]).ljust(8, b"\0"))[0]
            new = op[1] if op[1] > 64 else max(current + op[1], 0)
            data[:8] = struct.pack("<Q", new % 2**64)
    return bytes(data)


@FUZZ
@given(kind=st.sampled_from(KINDS), ops=st.lists(byte_ops, min_size=1, max_size=6), region=regions,
       strict=st.booleans())
def test_byte_mutations_never_escape_our_errors(workdir, kind, ops, region, strict):
    path = workdir / "bytes.safetensors"
    path.write_bytes(mutate_bytes(_VALID[kind], ops, region))
    exercise_load(path, strict)


# ----------------------------------------------------------------------------- the JSON header

SAFETENSORS_DTYPES = ["F64", "F32", "F16", "BF16", "I64", "I32", "I16", "I8", "U8", "U16", "U32", "U64", "BOOL",
                      "F8_E4M3", "F8_E5M2", "C64", "F4", "E8M0", "Q7"]
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=6), children, max_size=4),
    max_leaves=12,
)
names = st.one_of(
    st.text(max_size=40),
    st.sampled_from(["lycoris_proj", "lycoris_conv", "lycoris_head", "lycoris_blocks_0", "lycoris_point",
                     "lycoris_norm", "lycoris_blocks", "lycoris", "lora_unet_proj", "lycoris_proj_"]),
)
suffixes = st.sampled_from(["lora_down.weight", "lora_up.weight", "lora_mid.weight", "alpha", "dora_scale",
                            "hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "lokr_w1", "lokr_w1_a",
                            "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2", "weight", "on_input", "diff", "diff_b",
                            "", "lora_down", "x.y.z"])
header_ops = st.one_of(
    st.tuples(st.just("dtype"), st.integers(0, 99), st.sampled_from(SAFETENSORS_DTYPES)),
    st.tuples(st.just("shape"), st.integers(0, 99), st.lists(st.integers(0, 40), max_size=5)),
    st.tuples(st.just("offsets"), st.integers(0, 99), st.lists(st.integers(-5, 20_000), min_size=0, max_size=3)),
    st.tuples(st.just("rename"), st.integers(0, 99), names, suffixes),
    st.tuples(st.just("delete"), st.integers(0, 99)),
    st.tuples(st.just("duplicate"), st.integers(0, 99), names, suffixes),
    st.tuples(st.just("entry"), st.integers(0, 99), json_values),
    st.tuples(st.just("metadata"), st.dictionaries(st.sampled_from(["lycoris_like.config", "ss_network_args", "x"]),
                                                   st.one_of(st.text(max_size=20), json_values.map(json.dumps)),
                                                   max_size=3)),
    st.tuples(st.just("metadata-json"), json_values),
    st.tuples(st.just("whole"), json_values),
)


def mutate_header(blob: bytes, ops: list[tuple], length_delta: int, pad: int) -> bytes:
    n = struct.unpack("<Q", blob[:8])[0]
    header = json.loads(blob[8:8 + n])
    data = blob[8 + n:]
    for op in ops:
        if not isinstance(header, dict):
            break
        keys = sorted(k for k in header if k != "__metadata__")
        key = keys[op[1] % len(keys)] if keys and isinstance(op[1], int) and op[0] != "metadata" else None
        kind = op[0]
        if kind in ("dtype", "shape", "offsets") and key is not None and isinstance(header[key], dict):
            header[key] = {**header[key], {"dtype": "dtype", "shape": "shape", "offsets": "data_offsets"}[kind]: op[2]}
        elif kind == "rename" and key is not None:
            header[f"{op[2]}.{op[3]}" if op[3] else op[2]] = header.pop(key)
        elif kind == "delete" and key is not None:
            del header[key]
        elif kind == "duplicate" and key is not None:
            header[f"{op[2]}.{op[3]}"] = header[key]
        elif kind == "entry" and key is not None:
            header[key] = op[2]
        elif kind == "metadata":
            header["__metadata__"] = op[1]
        elif kind == "metadata-json":
            header["__metadata__"] = op[1]
        elif kind == "whole":
            header = op[1]
    text = json.dumps(header).encode() + b" " * pad
    return struct.pack("<Q", max(len(text) + length_delta, 0)) + text + data


@FUZZ
@given(kind=st.sampled_from(KINDS), ops=st.lists(header_ops, min_size=1, max_size=4),
       length_delta=st.sampled_from([0, 0, 0, 0, 1, -1, 8, -8]), pad=st.sampled_from([0, 0, 3, 8]),
       strict=st.booleans())
def test_header_mutations_never_escape_our_errors(workdir, kind, ops, length_delta, pad, strict):
    path = workdir / "header.safetensors"
    path.write_bytes(mutate_header(_VALID[kind], ops, length_delta, pad))
    exercise_load(path, strict)


# ----------------------------------------------------------------------------- the tensors

_DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.int64, torch.int32, torch.int8,
           torch.uint8, torch.bool, torch.int16]
_MODULES = ["lycoris_proj", "lycoris_conv", "lycoris_point", "lycoris_head", "lycoris_blocks_0", "lycoris_norm",
            "lycoris", "lycoris_x", "lora_unet_proj"]
values = st.sampled_from([0.0, -0.0, 1.0, -1.0, 0.5, 2.0, 1e-30, 1e30, -1e38, 3.0e38, 65504.0, 7.0])
tensor_ops = st.one_of(
    st.tuples(st.just("drop"), st.integers(0, 99)),
    st.tuples(st.just("shape"), st.integers(0, 99), st.lists(st.integers(0, 24), max_size=5)),
    st.tuples(st.just("grow"), st.integers(0, 99), st.integers(0, 4), st.integers(-3, 3)),
    st.tuples(st.just("dtype"), st.integers(0, 99), st.sampled_from(_DTYPES)),
    st.tuples(st.just("scale"), st.integers(0, 99), values),
    st.tuples(st.just("fill"), st.integers(0, 99), values),
    st.tuples(st.just("move"), st.integers(0, 99), st.sampled_from(_MODULES)),
    st.tuples(st.just("resuffix"), st.integers(0, 99), suffixes),
    st.tuples(st.just("scalar"), st.integers(0, 99), values),
    st.tuples(st.just("flatten"), st.integers(0, 99)),
    st.tuples(st.just("transpose"), st.integers(0, 99)),
    st.tuples(st.just("copy"), st.integers(0, 99), st.integers(0, 99)),
)


def mutate_tensors(tensors: dict[str, torch.Tensor], ops: list[tuple], seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    for op in ops:
        if not tensors:
            break
        keys = sorted(tensors)
        key = keys[op[1] % len(keys)]
        t = tensors[key]
        kind = op[0]
        if kind == "drop":
            del tensors[key]
        elif kind == "shape":
            tensors[key] = torch.randn(op[2], generator=g).to(t.dtype)
        elif kind == "grow" and t.dim():
            shape = list(t.shape)
            axis = op[2] % len(shape)
            shape[axis] = max(shape[axis] + op[3], 0)
            tensors[key] = torch.randn(shape, generator=g).to(t.dtype)
        elif kind == "dtype":
            tensors[key] = t.to(op[2])
        elif kind == "scale" and t.is_floating_point():
            tensors[key] = (t.double() * op[2]).to(t.dtype)
        elif kind == "fill":
            tensors[key] = torch.full_like(t, op[2]) if t.is_floating_point() else torch.full_like(t, int(op[2] % 7))
        elif kind == "move":
            tensors[op[2] + "." + key.partition(".")[2]] = tensors.pop(key)
        elif kind == "resuffix":
            tensors[key.partition(".")[0] + ("." + op[2] if op[2] else "")] = tensors.pop(key)
        elif kind == "scalar":
            tensors[key] = torch.tensor(op[2])
        elif kind == "flatten":
            tensors[key] = t.reshape(-1).clone()
        elif kind == "transpose" and t.dim() >= 2:
            tensors[key] = t.transpose(0, 1).contiguous()
        elif kind == "copy":
            tensors[key] = tensors[keys[op[2] % len(keys)]].clone()
    return {k: v.contiguous().clone() for k, v in tensors.items()}


@FUZZ
@given(kind=st.sampled_from(KINDS), ops=st.lists(tensor_ops, min_size=1, max_size=4), seed=st.integers(0, 2**16),
       strict=st.booleans())
def test_tensor_mutations_never_escape_our_errors(workdir, kind, ops, seed, strict):
    tensors = mutate_tensors(zoo_file(kind), ops, seed)
    path = workdir / "tensors.safetensors"
    path.write_bytes(save(tensors))
    exercise_load(path, strict)


def test_the_fuzzers_reach_both_outcomes(workdir):
    """A fuzzer that only ever sees refusals (or only successes) tests little: check that simple
    mutations of each kind produce both."""
    blob = _VALID["mixed"]
    outcomes = set()
    for ops, region in (([("flip", 0.999, 0)], "anywhere"), ([("flip", 0.5, 3)], "header")):
        path = workdir / "reach.safetensors"
        path.write_bytes(mutate_bytes(blob, ops, region))
        outcomes.add(exercise_load(path, True))
    assert outcomes == {"loaded", "refused"}
    outcomes = set()
    for ops in ([("metadata", {"x": "y"})], [("dtype", 0, "Q7")]):
        path.write_bytes(mutate_header(blob, ops, 0, 0))
        outcomes.add(exercise_load(path, True))
    assert outcomes == {"loaded", "refused"}
    outcomes = set()
    for ops in ([("scale", 1, 2.0)], [("drop", 2)]):
        path.write_bytes(save(mutate_tensors(zoo_file("mixed"), ops, 0)))
        outcomes.add(exercise_load(path, True))
    assert outcomes == {"loaded", "refused"}

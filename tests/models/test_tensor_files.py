"""safetensors read and written a tensor at a time: the reference library reads what we write
and we read what it writes (every dtype peftjax stores, bf16 included), row ranges, and a
malformed file is an error naming it."""

import json
import struct

import ml_dtypes
import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

from peftjax.models import tensor_files as tf


def sample():
    rng = np.random.default_rng(0)
    return {"w": rng.standard_normal((5, 3)).astype(np.float32),
            "h": rng.standard_normal((4, 2, 3)).astype(np.float16),
            "b": rng.standard_normal((6, 2)).astype(ml_dtypes.bfloat16),
            "i": np.arange(7, dtype=np.int64), "s": np.array(3.5, np.float32)}


def test_reads_what_safetensors_writes_and_row_ranges(tmp_path):
    tensors = sample()
    save_file(tensors, str(tmp_path / "a.safetensors"), metadata={"format": "pt"})
    index = tf.TensorIndex([str(tmp_path / "a.safetensors")])
    assert sorted(index) == sorted(tensors)
    for name, value in tensors.items():
        got = index.read(name)
        assert got.dtype == value.dtype and got.shape == value.shape and got.tobytes() == value.tobytes()
        assert got.ctypes.data % tf.ALIGN == 0      # adoptable by JAX's CPU client without a copy
    np.testing.assert_array_equal(index.read("h", slice(1, 3)), tensors["h"][1:3])
    assert index.read("w", slice(5, 5)).shape == (0, 3)
    assert index["b"].nbytes == 6 * 2 * 2


def test_safetensors_reads_what_we_write(tmp_path):
    tensors = sample()
    calls = []

    def producer(name):
        def produce():
            calls.append(name)
            return tensors[name]
        return produce

    path = str(tmp_path / "b.safetensors")
    tf.write(path, [(k, v.shape, v.dtype, producer(k)) for k, v in tensors.items()], {"format": "pt"})
    assert calls == list(tensors)        # one at a time, in order
    back = load_file(path)
    for name, value in tensors.items():
        assert back[name].tobytes() == value.tobytes() and back[name].shape == value.shape
    with safe_open(path, "np") as f:
        assert f.metadata() == {"format": "pt"}
    (n,) = struct.unpack("<Q", open(path, "rb").read(8))
    assert n % 8 == 0
    with pytest.raises(tf.TensorFileError, match="declared"):
        tf.write(str(tmp_path / "c.safetensors"), [("w", (2, 2), np.float32, lambda: np.zeros((2, 3), np.float32))])


def test_malformed_files_are_named(tmp_path):
    good = tmp_path / "good.safetensors"
    save_file({"w": np.ones((4, 4), np.float32)}, str(good))
    raw = good.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    cases = {"short": raw[:5], "huge_header": struct.pack("<Q", 1 << 40) + raw[8:],
             "truncated": raw[:-8], "not_json": raw[:8] + b"{" * n + raw[8 + n:]}
    header = json.loads(raw[8:8 + n])
    header["w"]["dtype"] = "Q7"
    bad = json.dumps(header).encode()
    cases["dtype"] = struct.pack("<Q", len(bad)) + bad + raw[8 + n:]
    for name, data in cases.items():
        path = tmp_path / f"{name}.safetensors"
        path.write_bytes(data)
        with pytest.raises(tf.TensorFileError, match=name):
            tf.TensorIndex([str(path)])
    other = tmp_path / "other.safetensors"
    save_file({"w": np.ones(2, np.float32)}, str(other))
    with pytest.raises(tf.TensorFileError, match="in both"):
        tf.TensorIndex([str(good), str(other)])

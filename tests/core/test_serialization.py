"""The zero-copy safetensors writer: any dtype, shape and layout round-trips through the safetensors library."""

import os

import pytest
import torch
from safetensors import safe_open

from adapterflow import serialization


@pytest.mark.parametrize("chunk", [7, 1 << 20])
def test_tensors_round_trip_through_the_safetensors_reader(tmp_path, monkeypatch, chunk):
    monkeypatch.setattr(serialization, "_WRITEBACK_CHUNK", chunk)  # tiny groups: every split path runs
    tensors = {
        "a.bf16": torch.randn(3, 5).to(torch.bfloat16),
        "b.fp32": torch.randn(17, 3),
        "c.fp16.transposed": torch.randn(4, 6).half().T,
        "d.int64": torch.arange(5),
        "e.empty": torch.zeros(0, 4),
        "f.bool": torch.tensor([True, False, True]),
        "g.scalar": torch.tensor(2.5),
    }
    fd = os.open(tmp_path / "x.safetensors", os.O_WRONLY | os.O_CREAT)
    serialization.write_safetensors(fd, tensors, {"format": "pt"})
    os.close(fd)
    with safe_open(str(tmp_path / "x.safetensors"), "pt") as f:
        assert f.metadata() == {"format": "pt"} and set(f.keys()) == set(tensors)
        for name, tensor in tensors.items():
            assert torch.equal(f.get_tensor(name), tensor), name


def test_unsupported_dtype_is_refused(tmp_path):
    with pytest.raises(TypeError, match="complex64, which safetensors cannot store"):
        serialization.write_safetensors(0, {"x": torch.zeros(2, dtype=torch.complex64)})

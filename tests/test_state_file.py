"""The learner's state file (mmcl_edge/state_file.py) is plain safetensors, written tensor by tensor."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save

from mmcl_edge.backbones import TapSpec
from mmcl_edge.config import EncoderConfig
from mmcl_edge.model import MMCLModel
from mmcl_edge.state_file import write_state


def test_a_streamed_state_reads_back_as_safetensors_writes_it(tmp_path):
    taps = {"a": (TapSpec("x", 4, 24), TapSpec("y", 4, 40)), "b": (TapSpec("x", 2, 16),)}
    model = MMCLModel(taps, EncoderConfig(width=16, experts=4, bottleneck=4, tap_rank=4), "class-il",
                      n_classes=3, head_blocks=[3], head_mode="analytic")
    torch.manual_seed(0)
    head = model.analytic
    f = torch.randn(700, head.gram.shape[0], dtype=torch.float64)   # > 256 rows: several conversion blocks
    head.update(f, torch.randint(0, 3, (700,)))
    model.encoder.pools[0].freeze(1)                                 # a bool buffer too
    state = model.state_dict()
    write_state(tmp_path / "s.safetensors", state)
    got = load_file(str(tmp_path / "s.safetensors"))
    expected = {k: (v.float() if v.dtype == torch.float64 else v) for k, v in state.items()}
    assert list(got) and set(got) == set(expected)
    for k, v in expected.items():
        assert got[k].dtype == v.dtype and torch.equal(got[k], v), k
    assert got["analytic.gram"].abs().sum() > 0
    reference = tmp_path / "ref.safetensors"
    reference.write_bytes(save({k: v.contiguous() for k, v in expected.items()}))
    assert load_file(str(reference)).keys() == got.keys()
    # and the model loads from it, as a workspace does
    fresh = MMCLModel.from_description(model.describe())
    fresh.load_state_dict(got)
    assert torch.equal(fresh.analytic.gram, state["analytic.gram"].float().double())


def test_a_tensor_type_the_file_cannot_hold_is_refused_and_nothing_is_left(tmp_path):
    with pytest.raises(TypeError, match="complex"):
        write_state(tmp_path / "s.safetensors", {"z": torch.zeros(3, dtype=torch.complex64)})
    assert list(tmp_path.iterdir()) == []

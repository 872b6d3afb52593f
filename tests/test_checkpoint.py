import pytest
import torch

from kbricks.core.checkpoint import (
    fingerprint,
    load_checkpoint,
    load_safetensors,
    load_state_into,
    remap_prefix,
    save_checkpoint,
    save_safetensors,
)
from kbricks.errors import CheckpointError
from kbricks.models import create_model


def test_checkpoint_round_trip_with_weights_only(tmp_path):
    m = create_model("mlp", num_classes=3, in_channels=1, image_size=4, hidden=[5])
    opt = torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9)
    m(torch.randn(2, 1, 4, 4)).sum().backward()
    opt.step()
    save_checkpoint({"model": m.state_dict(), "optimizer": opt.state_dict(), "epoch": 3, "config": {"a": [1, "b"]}}, tmp_path / "c.pt")
    state = load_checkpoint(tmp_path / "c.pt")
    assert state["epoch"] == 3 and state["config"] == {"a": [1, "b"]}
    m2 = create_model("mlp", num_classes=3, in_channels=1, image_size=4, hidden=[5])
    load_state_into(m2, state["model"])
    assert all(torch.equal(a, b) for a, b in zip(m.state_dict().values(), m2.state_dict().values()))
    assert not list(tmp_path.glob(".*tmp"))  # no temp files left behind


def test_corrupt_and_foreign_checkpoints_are_refused(tmp_path):
    p = tmp_path / "bad.pt"
    p.write_bytes(b"\x00garbage" * 10)
    with pytest.raises(CheckpointError, match="corrupt or not a kbricks checkpoint"):
        load_checkpoint(p)
    save_checkpoint({"x": torch.ones(2)}, tmp_path / "ok.pt")
    data = (tmp_path / "ok.pt").read_bytes()
    (tmp_path / "trunc.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="corrupt"):
        load_checkpoint(tmp_path / "trunc.pt")
    torch.save({"model": {}}, tmp_path / "foreign.pt")
    with pytest.raises(CheckpointError, match="no 'kbricks-checkpoint-v1' marker"):
        load_checkpoint(tmp_path / "foreign.pt")
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.pt")


def test_pickled_code_in_checkpoint_is_not_executed(tmp_path):
    class Boom:
        def __reduce__(self):
            return (print, ("executed!",))

    torch.save({"format": "kbricks-checkpoint-v1", "x": Boom()}, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match=r"evil.pt needs code to unpickle \(it refers to print\)") as err:
        load_checkpoint(tmp_path / "evil.pt")
    assert "weights_only=False" not in str(err.value) and "weights_only` set to `False" not in str(err.value)


def test_mismatched_state_dict_message():
    small = create_model("mlp", num_classes=3, in_channels=1, image_size=4, hidden=[5])
    big = create_model("mlp", num_classes=4, in_channels=1, image_size=4, hidden=[5, 5])
    with pytest.raises(CheckpointError) as info:
        load_state_into(small, big.state_dict())
    msg = str(info.value)
    assert "unexpected keys" in msg and "shape mismatch head.weight: checkpoint (4, 5) vs model (3, 5)" in msg


def test_safetensors_round_trip_and_fingerprint(tmp_path):
    sd = {"a": torch.randn(3, 2), "b": torch.arange(4), "scalar": torch.tensor(7)}
    save_safetensors(sd, tmp_path / "w.safetensors", {"note": "x"})
    back = load_safetensors(tmp_path / "w.safetensors")
    assert all(torch.equal(sd[k], back[k]) for k in sd)
    assert fingerprint(sd) == fingerprint(back) == fingerprint(dict(reversed(list(sd.items()))))
    changed = dict(sd, a=sd["a"] + 1e-3)
    assert fingerprint(changed) != fingerprint(sd)
    (tmp_path / "bad.safetensors").write_bytes(b"12345678garbage")
    with pytest.raises(CheckpointError, match="corrupt or not safetensors"):
        load_safetensors(tmp_path / "bad.safetensors")


def test_remap_prefix():
    sd = {"module.head.weight": 1, "module.body.0.bias": 2, "other": 3}
    assert remap_prefix(sd, "module.") == {"head.weight": 1, "body.0.bias": 2, "other": 3}

"""Checkpoints: atomic writes, exact round trip, tied weights, and clear errors for broken or foreign ones."""

import json
import os
import random

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from reciprocal_attention.lab import atomic
from reciprocal_attention.lab import checkpoint as C
from reciprocal_attention.model import GPT, GPTConfig




def tiny(attn="ra", seed=0, **kw):
    return GPT(GPTConfig(**{**dict(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=50, attn=attn), **kw}),
               seed=seed)


def trained(attn="ra"):
    model = tiny(attn)
    opt = model.configure_optimizers(0.1, 1e-2, (0.9, 0.95))
    for i in range(3):
        idx = torch.randint(0, 50, (2, 16), generator=torch.Generator().manual_seed(i))
        model(idx, idx)[1].backward()
        opt.step()
        opt.zero_grad()
    return model, opt


def test_atomic_write_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "f.bin"

    def fail(f):
        f.write(b"partial data")
        raise RuntimeError("disk on fire")

    with pytest.raises(RuntimeError, match="disk on fire"):
        atomic.write_stream(target, fail)
    assert list(tmp_path.iterdir()) == []  # neither the target nor a temp file
    atomic.write_bytes(target, b"old")
    with pytest.raises(RuntimeError):
        atomic.write_stream(target, fail)
    assert target.read_bytes() == b"old" and list(tmp_path.iterdir()) == [target]


def test_round_trip_is_exact(tmp_path):
    model, opt = trained()
    random.seed(5)
    np.random.seed(6)
    torch.manual_seed(7)
    d = C.save_checkpoint(tmp_path / "ck", 3, model, opt, {"data_position": 12, "note": "x"})
    after_save = (random.random(), np.random.rand(), torch.rand(3))

    fresh = tiny(seed=99)
    fresh_opt = fresh.configure_optimizers(0.1, 1e-2, (0.9, 0.95))
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    state = C.load_checkpoint(tmp_path / "ck", fresh, fresh_opt)
    assert state["step"] == 3 and state["data_position"] == 12 and state["dir"] == str(d)
    for (n, p), (_, q) in zip(model.state_dict().items(), fresh.state_dict().items()):
        assert torch.equal(p, q), n
    assert fresh.lm_head.weight is fresh.transformer.wte.weight  # still tied
    s1, s2 = opt.state_dict(), fresh_opt.state_dict()
    assert s1["param_groups"] == s2["param_groups"]
    for k in s1["state"]:
        for name in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(s1["state"][k][name], s2["state"][k][name])
    after_load = (random.random(), np.random.rand(), torch.rand(3))
    assert after_save[:2] == after_load[:2] and torch.equal(after_save[2], after_load[2])


def test_tied_weight_saved_once(tmp_path):
    model = tiny("standard")
    C.save_model(tmp_path / "m.safetensors", model)
    keys = load_file(str(tmp_path / "m.safetensors")).keys()
    assert "transformer.wte.weight" in keys and "lm_head.weight" not in keys
    other = tiny("standard", seed=1)
    C.load_model(tmp_path / "m.safetensors", other)
    assert torch.equal(other.lm_head.weight, model.lm_head.weight)


def test_latest_pointer_retention_and_no_overwrite(tmp_path):
    model, opt = trained()
    root = tmp_path / "run" / "checkpoints"
    for step in (10, 20, 30):
        C.save_checkpoint(root, step, model, opt, {}, keep_last=2)
    assert [p.name for p in C.list_checkpoints(root)] == ["step_000020", "step_000030"]
    assert (root / "latest").read_text().strip() == "step_000030"
    assert C.resolve_checkpoint(tmp_path / "run") == root / "step_000030"
    assert C.resolve_checkpoint(root / "step_000020") == root / "step_000020"
    with pytest.raises(C.CheckpointError, match="refusing to overwrite"):
        C.save_checkpoint(root, 30, model, opt, {})
    assert not [p for p in root.iterdir() if p.name.startswith(".")]  # no partial directories left


def test_truncated_or_corrupt_files_are_named(tmp_path):
    model, opt = trained()
    d = C.save_checkpoint(tmp_path, 1, model, opt, {})
    blob = (d / C.MODEL_FILE).read_bytes()

    (d / C.MODEL_FILE).write_bytes(blob[: len(blob) // 2])
    with pytest.raises(C.CheckpointError, match=r"model\.safetensors: \d+ bytes.*truncated"):
        C.load_checkpoint(d, tiny())
    with pytest.raises(C.CheckpointError, match=r"model\.safetensors: not a readable safetensors"):
        C.load_model(d / C.MODEL_FILE, tiny())

    corrupt = bytearray(blob)
    corrupt[-1] ^= 0xFF
    (d / C.MODEL_FILE).write_bytes(bytes(corrupt))
    with pytest.raises(C.CheckpointError, match=r"model\.safetensors: sha256"):
        C.load_checkpoint(d, tiny())

    (d / C.MODEL_FILE).write_bytes(blob)
    (d / C.OPTIM_FILE).unlink()
    with pytest.raises(C.CheckpointError, match=r"optimizer\.safetensors is missing"):
        C.load_checkpoint(d, tiny())

    (d / C.STATE_FILE).unlink()
    with pytest.raises(C.CheckpointError, match=r"state\.json is missing.*incomplete"):
        C.load_checkpoint(d, tiny())
    with pytest.raises(C.CheckpointError, match="does not exist"):
        C.load_checkpoint(tmp_path / "nope", tiny())


def test_foreign_checkpoints_are_rejected(tmp_path):
    model, opt = trained("ra")
    d = C.save_checkpoint(tmp_path, 1, model, opt, {})
    with pytest.raises(C.CheckpointError, match=r"model\.safetensors does not match the model: missing \[\], "
                                                r"unexpected \['transformer.h.0.attn.W_recip'"):
        C.load_checkpoint(d, tiny("standard"))
    with pytest.raises(C.CheckpointError, match="shape/dtype mismatch"):
        C.load_checkpoint(d, tiny("ra", n_embd=64))
    # a safetensors file that is not ours
    save_file({"w": torch.zeros(2)}, str(tmp_path / "foreign.safetensors"))
    with pytest.raises(C.CheckpointError, match="not a reciprocal_attention checkpoint"):
        C.load_model(tmp_path / "foreign.safetensors", tiny())
    # random bytes
    (tmp_path / "junk.safetensors").write_bytes(os.urandom(64))
    with pytest.raises(C.CheckpointError, match="junk.safetensors: not a readable"):
        C.load_model(tmp_path / "junk.safetensors", tiny())
    # a state.json from something else
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / C.STATE_FILE).write_text(json.dumps({"step": 1}))
    with pytest.raises(C.CheckpointError, match="not a reciprocal_attention checkpoint"):
        C.load_checkpoint(tmp_path / "other", tiny())
    # an optimizer that does not fit
    other_opt = torch.optim.SGD(tiny().parameters(), lr=0.1)
    with pytest.raises(C.CheckpointError, match=r"optimizer\.safetensors: 2 param groups saved, the optimizer has 1"):
        C.load_checkpoint(d, tiny(), other_opt)

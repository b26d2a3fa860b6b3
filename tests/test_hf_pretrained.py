"""Converted GPT-2s the transformers way: save_pretrained / from_pretrained / AutoModelForCausalLM round trips
against transformers' own outputs, a plain GPT-2 loader refusing a converted checkpoint, layer selections of any
integer sequence, Trainer-style checkpoints, and cached generation under torch.compile without a recompile per
token. Random-init tiny configs only (no hub downloads)."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")

from transformers import AutoConfig, AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel, GPT2Model  # noqa: E402

from reciprocal_attention.hf import (GPT2ReciprocalConfig, GPT2ReciprocalLMHeadModel,  # noqa: E402
                                     GPT2ReciprocalModel, convert_gpt2, converted_layers, layer_indices,
                                     load_pretrained, unconvert_gpt2)

FP32_TOL = 1e-6


def make_model(cls=GPT2LMHeadModel, seed=0, **kw):
    base = dict(n_layer=2, n_head=4, n_embd=64, vocab_size=100, n_positions=64, initializer_range=0.2,
                bos_token_id=None, eos_token_id=None, pad_token_id=0)
    base.update(kw)
    torch.manual_seed(seed)
    return cls(GPT2Config(**base)).eval()


@pytest.fixture(scope="module")
def gpt2():
    return make_model()


@pytest.fixture(scope="module")
def ids():
    return torch.randint(1, 100, (2, 12), generator=torch.Generator().manual_seed(1))


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def maxdiff(a, b):
    return (a - b).abs().max().item()


def trained(model, ids, steps=3):
    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=3e-2)
    for _ in range(steps):
        loss = model(ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


@pytest.mark.parametrize("preset,kw", [("low_rank", {}), ("ra_disc", {"variant": "low_rank"}), ("full", {})])
def test_save_pretrained_round_trip_fp32(gpt2, ids, tmp_path, preset, kw):
    m = convert_gpt2(copy.deepcopy(gpt2), preset=preset, **kw)
    assert type(m) is GPT2ReciprocalLMHeadModel and isinstance(m.config, GPT2ReciprocalConfig)
    assert m.config.model_type == "gpt2-reciprocal" and m.config.ra_preset == preset
    assert maxdiff(logits(m, ids), logits(gpt2, ids)) <= FP32_TOL  # transformers' own GPT-2, right after
    trained(m, ids)
    want = logits(m, ids)
    assert maxdiff(want, logits(gpt2, ids)) > 1e-3  # RA moved the function: the round trip below is not trivial
    m.save_pretrained(tmp_path)
    for loader in (AutoModelForCausalLM, GPT2ReciprocalLMHeadModel):
        loaded = loader.from_pretrained(tmp_path).eval()
        assert type(loaded) is GPT2ReciprocalLMHeadModel and converted_layers(loaded) == [0, 1]
        assert loaded.transformer.h[0].attn.preset == preset
        assert maxdiff(logits(loaded, ids), want) <= FP32_TOL
    assert isinstance(AutoConfig.from_pretrained(tmp_path), GPT2ReciprocalConfig)


def test_plain_gpt2_loader_refuses_converted_checkpoint(gpt2, tmp_path):
    convert_gpt2(copy.deepcopy(gpt2), layers=[1]).save_pretrained(tmp_path)
    with pytest.raises(Exception, match="reciprocal_attention"):
        GPT2LMHeadModel.from_pretrained(tmp_path)
    with pytest.raises(Exception, match="reciprocal_attention"):
        GPT2Config.from_pretrained(tmp_path)


@pytest.mark.parametrize("layers", [np.arange(2), np.array([1], dtype=np.int32), torch.tensor([0, 1]), range(1, 2),
                                    (np.int64(0),), torch.tensor([1])])
def test_layers_any_integer_sequence(gpt2, ids, layers):
    m = convert_gpt2(copy.deepcopy(gpt2), layers=layers)
    want = sorted(int(i) for i in layers)
    assert converted_layers(m) == want and m.config.ra_layers == want
    assert maxdiff(logits(m, ids), logits(gpt2, ids)) <= FP32_TOL


@pytest.mark.parametrize("layers", [np.array([0.0, 1.0]), torch.tensor([0.5]), np.array([[0, 1]]),
                                    torch.tensor([True]), np.array([True])])
def test_layers_refuses_non_integers(gpt2, layers):
    with pytest.raises(ValueError, match="layer"):
        convert_gpt2(copy.deepcopy(gpt2), layers=layers)
    assert layer_indices(np.arange(3), 3) == [0, 1, 2]


def test_trainer_style_checkpoint_reloads_as_ra(gpt2, ids, tmp_path):
    """What transformers.Trainer._save writes (save_pretrained with an explicit state_dict into checkpoint-N)
    loads back as the RA model, generation included."""
    m = trained(convert_gpt2(copy.deepcopy(gpt2), layers="middle", preset="ra_disc", variant="low_rank"), ids)
    ckpt = tmp_path / "checkpoint-3"
    m.save_pretrained(ckpt, state_dict=m.state_dict())
    loaded = AutoModelForCausalLM.from_pretrained(ckpt).eval()
    assert converted_layers(loaded) == [0, 1]  # "middle" of 2 layers is every layer
    assert maxdiff(logits(loaded, ids), logits(m, ids)) <= FP32_TOL
    prompt = ids[:, :4]
    kw = dict(max_new_tokens=6, do_sample=False)
    assert torch.equal(loaded.generate(prompt, **kw), m.generate(prompt, **kw))
    assert type(load_pretrained(ckpt)) is GPT2ReciprocalLMHeadModel


def test_config_builds_model_and_unconvert_goes_back(gpt2, ids, tmp_path):
    cfg = GPT2ReciprocalConfig(n_layer=3, n_head=2, n_embd=32, vocab_size=50, n_positions=32, ra_layers=[0, 2],
                               ra_preset="full", bos_token_id=None, eos_token_id=None)
    assert cfg.ra_per_layer == {"0": {"preset": "full", "overrides": {}}, "2": {"preset": "full", "overrides": {}}}
    fresh = GPT2ReciprocalLMHeadModel(cfg)
    assert converted_layers(fresh) == [0, 2] and fresh.transformer.h[2].attn.ra.variant == "full"
    with pytest.raises(ValueError, match="layer"):
        GPT2ReciprocalConfig(n_layer=2, ra_layers=[5])
    bare = convert_gpt2(make_model(GPT2Model), layers=[0])
    assert type(bare) is GPT2ReciprocalModel
    bare.save_pretrained(tmp_path)
    assert type(load_pretrained(tmp_path)) is GPT2ReciprocalModel
    back = unconvert_gpt2(convert_gpt2(copy.deepcopy(gpt2)))
    assert type(back) is GPT2LMHeadModel and type(back.config) is GPT2Config
    assert "ra_per_layer" not in back.config.to_dict() and maxdiff(logits(back, ids), logits(gpt2, ids)) <= 1e-5


def test_compiled_cached_generation_does_not_recompile_per_token(ids):
    """Positional discoverability under torch.compile: the wrapper takes positions from transformers'
    position_ids and leaves out its host-side range check (int(pos.max()) would make dynamo guard on each
    token's position and recompile every step), so generation compiles prefill, the first decode step and one
    dynamic-length graph."""
    import torch._dynamo as dynamo
    from torch._dynamo.utils import counters

    m = convert_gpt2(make_model(n_layer=1), preset="ra_disc", variant="low_rank")
    prompt = ids[:1, :4]
    want = m.generate(prompt, max_new_tokens=12, do_sample=False)
    dynamo.reset()
    counters.clear()
    m.forward = torch.compile(m.forward, backend="eager")
    with dynamo.config.patch(recompile_limit=4, fail_on_recompile_limit_hit=True):
        got = m.generate(prompt, max_new_tokens=12, do_sample=False)
    assert torch.equal(got, want)
    assert counters["stats"]["unique_graphs"] <= 3, dict(counters["stats"])
    dynamo.reset()

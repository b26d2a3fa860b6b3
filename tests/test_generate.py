"""``ra generate``: the sampler (greedy, top-k, top-p, seeds), cached decoding equal to uncached, streaming, the
project's run directories and Hugging Face directories as sources, and clear errors for bad input."""

from __future__ import annotations

import io

import pytest
import torch

from reciprocal_attention.lab import generate as G
from reciprocal_attention.lab.errors import UserError

RUN_SETTINGS = ["system.device=cpu", "system.dtype=float32", "system.threads=1", "system.progress=false",
                "data.fixture=true", "data.batch_size=2", "eval.interval=0", "eval.iters=1", "budget.max_steps=2",
                "checkpoint.interval=0", "schedule.warmup_steps=1", "model.block_size=32", "optim.lr=3e-2"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A 2-step byte-tokenizer run of the tiny preset with RA (positional discoverability) on every layer."""
    from reciprocal_attention.lab import train as T
    from reciprocal_attention.lab.config import load_config

    out = tmp_path_factory.mktemp("gen") / "run"
    cfg = load_config("tiny", overrides=RUN_SETTINGS + [f"system.out_dir={out}", "model.attn=ra_disc"])
    n = torch.get_num_threads()
    try:
        T.train(cfg)
    finally:
        torch.set_num_threads(n)
    return out


# ----------------------------------------------------------------------------------------------------------------
# The sampler
# ----------------------------------------------------------------------------------------------------------------

def test_sample_next_greedy_top_k_top_p():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    assert G.sample_next(logits, temperature=0).item() == 0
    draws = lambda **kw: {G.sample_next(logits, generator=g, **kw).item()  # noqa: E731
                          for g in [torch.Generator().manual_seed(0)] for _ in range(300)}
    assert draws() == {0, 1, 2, 3}
    assert draws(top_k=2) == {0, 1}
    assert draws(top_p=0.7) == {0, 1}  # 0.5 < 0.7: the second token is needed to reach 0.7
    assert draws(top_p=0.5) == {0}
    assert draws(top_p=0.01) == {0}  # the most likely token always stays
    assert draws(top_k=3, top_p=0.99) == {0, 1, 2}
    a = G.sample_next(logits.repeat(8, 1), generator=torch.Generator().manual_seed(5))
    b = G.sample_next(logits.repeat(8, 1), generator=torch.Generator().manual_seed(5))
    assert torch.equal(a, b) and a.shape == (8, 1)


@pytest.mark.parametrize("kw,match", [({"temperature": -0.5}, "--temperature"), ({"top_p": 0.0}, "--top-p"),
                                      ({"top_p": 1.5}, "--top-p"), ({"top_k": 0}, "--top-k")])
def test_sampling_errors(kw, match):
    with pytest.raises(UserError, match=match):
        G.sample_next(torch.zeros(1, 4), **kw)


# ----------------------------------------------------------------------------------------------------------------
# A run directory of the project
# ----------------------------------------------------------------------------------------------------------------

def test_run_greedy_cache_equals_no_cache_beyond_context(run_dir):
    loaded = G.load_source(run_dir, torch.device("cpu"))
    assert loaded.kind == "gpt" and loaded.context == 32 and loaded.vocab_size == 257
    prompt = list(b"First Citizen:")
    n = 40  # past block_size (32): the cached decode hands over to the sliding window
    cached = G.generate_ids(loaded, prompt, n, temperature=0, use_cache=True)
    plain = G.generate_ids(loaded, prompt, n, temperature=0, use_cache=False)
    assert cached == plain and len(cached) == len(prompt) + n
    with torch.no_grad():
        want = loaded.model.generate(torch.tensor([prompt]), n, temperature=0.0)
    assert cached == want[0].tolist()  # the model's own greedy decoding


def test_run_seed_reproduces_and_streams(run_dir):
    kw = dict(prompt="To be", max_new_tokens=12, temperature=1.0, top_k=50, top_p=0.95, device="cpu")
    out1, out2, out3 = io.StringIO(), io.StringIO(), io.StringIO()
    a = G.generate_text(run_dir, seed=3, num_samples=2, out=out1, **kw)
    b = G.generate_text(run_dir, seed=3, num_samples=2, out=out2, **kw)
    c = G.generate_text(run_dir, seed=4, num_samples=2, out=out3, **kw)
    assert a == b and out1.getvalue() == out2.getvalue() and a != c
    assert a[0] != a[1]  # one generator drives both samples
    text = out1.getvalue()
    assert text.startswith("--- sample 1/2 ---\nTo be" + a[0]) and "--- sample 2/2 ---\nTo be" + a[1] in text


def test_cli_stdin_and_step_dir(run_dir, capsys, monkeypatch):
    from reciprocal_attention.lab import checkpoint as ckpt
    from reciprocal_attention.lab.cli import main

    step = ckpt.resolve_checkpoint(run_dir)
    monkeypatch.setattr("sys.stdin", io.StringIO("Hello"))
    assert main(["generate", str(step), "--max-new-tokens", "5", "--temperature", "0", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("Hello") and out.endswith("\n")


@pytest.mark.parametrize("argv,match", [
    (["MISSING", "--prompt", "a"], "does not exist"),
    (["RUN", "--prompt", "a", "--temperature", "-1"], "--temperature"),
    (["RUN", "--prompt", "a", "--top-p", "0"], "--top-p"),
    (["RUN", "--prompt", "a", "--top-p", "1.01"], "--top-p"),
    (["RUN", "--prompt", "a", "--num-samples", "0"], "--num-samples"),
    (["RUN", "--prompt", "a", "--max-new-tokens", "-3"], "--max-new-tokens"),
    (["RUN", "--prompt", "a", "--device", "tpu"], "--device"),
    (["EMPTY", "--prompt", "a"], "no committed checkpoint"),
])
def test_cli_user_errors_one_line_exit_2(run_dir, tmp_path, capsys, argv, match):
    from reciprocal_attention.lab.cli import main

    (tmp_path / "empty").mkdir()
    paths = {"MISSING": str(tmp_path / "nope"), "RUN": str(run_dir), "EMPTY": str(tmp_path / "empty")}
    assert main(["generate", *[paths.get(a, a) for a in argv]]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and match in err, err


def test_every_option_has_help():
    actions = [a for a in G.build_parser()._actions if a.dest != "help"]
    assert actions and all(a.help for a in actions)


# ----------------------------------------------------------------------------------------------------------------
# A Hugging Face directory (plain and converted GPT-2)
# ----------------------------------------------------------------------------------------------------------------

def test_hf_directories(tmp_path):
    transformers = pytest.importorskip("transformers")
    from reciprocal_attention.hf import convert_gpt2

    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=2, n_head=2, n_embd=32, vocab_size=257, n_positions=24,
                                  initializer_range=0.3, bos_token_id=None, eos_token_id=None)
    plain = transformers.GPT2LMHeadModel(cfg).eval()
    plain.save_pretrained(tmp_path / "plain")
    convert_gpt2(plain, preset="ra_disc", variant="low_rank")
    with torch.no_grad():
        for b in plain.transformer.h:  # RA live, so the converted model differs from GPT-2
            b.attn.ra.w_rec.fill_(0.7)
            b.attn.ra.d_bias.normal_(0, 1.0)
    plain.save_pretrained(tmp_path / "ra")
    prompt = list(b"abc")
    for name in ("plain", "ra"):
        loaded = G.load_source(tmp_path / name, torch.device("cpu"))
        assert loaded.kind == "hf" and loaded.context == 24
        cached = G.generate_ids(loaded, prompt, 30, temperature=0, use_cache=True)  # 33 > n_positions: slides
        assert cached == G.generate_ids(loaded, prompt, 30, temperature=0, use_cache=False)
        with torch.no_grad():
            hf = loaded.model.generate(torch.tensor([prompt]), max_new_tokens=20, do_sample=False)
        assert cached[:23] == hf[0].tolist()  # transformers' own greedy decoding, within the context
    ra = G.load_source(tmp_path / "ra", torch.device("cpu")).model
    assert type(ra).__name__ == "GPT2ReciprocalLMHeadModel"
    texts = G.generate_text(tmp_path / "ra", "abc", max_new_tokens=8, seed=1, out=io.StringIO(), device="cpu")
    assert texts == G.generate_text(tmp_path / "ra", "abc", max_new_tokens=8, seed=1, out=io.StringIO(),
                                    device="cpu")

"""Rollout backends (sppo_fast/rollout.py): hf, hf-static and paged give the same responses under greedy decoding,
honour EOS / min_new_tokens / stop strings / several samples per prompt the same way, and sampled responses are
valid token sequences that end where they should. The embedded tiny model, on CPU."""
import copy
import threading

import pytest
import torch

from sppo_fast import rollout
from sppo_fast.rollout import BACKENDS, _autocast_in_worker, _cut, generate, resolve_backend

PROMPTS = ["27+2+5=", "3+4=", "11+9+9+1=", "60+7+8+1=", "5+5="]  # different lengths: left padding is exercised
EOS = 2


@pytest.fixture(scope="module")
def tiny():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sppo_fast.tiny import default_model_path

    torch.set_num_threads(min(2, torch.get_num_threads()))
    path = default_model_path()
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="sdpa")
    model.train()  # as in the trainer: generate must switch to eval and back
    return model, AutoTokenizer.from_pretrained(path)


def run(tiny, backend, **kw):
    model, tok = tiny
    kw = {"max_new_tokens": 24, **kw}
    samples = generate(model, tok, PROMPTS, backend=backend, **kw)
    assert model.training, "generate must restore training mode"
    return samples


def key(samples):
    return [(s.row, s.prompt_ids, s.response_ids, s.finished, s.text) for s in samples]


@pytest.mark.parametrize("extra", [dict(), dict(stop_strings=[","]), dict(min_new_tokens=20, max_new_tokens=22),
                                   dict(num_samples=2, max_batch=3)],
                         ids=["plain", "stop-string", "min-new-tokens", "two-samples-chunked"])
def test_greedy_is_identical_across_backends(tiny, extra):
    outs = {b: run(tiny, b, greedy=True, **extra) for b in BACKENDS}
    ref = outs["hf"]
    n = extra.get("num_samples", 1)
    assert [s.row for s in ref] == [i for i in range(len(PROMPTS)) for _ in range(n)]
    for b in BACKENDS[1:]:
        assert key(outs[b]) == key(ref), f"{b} differs from hf under greedy decoding"
    # the case actually exercises what it names
    if "stop_strings" in extra:
        cut = [s for s in ref if s.text.endswith(",")]
        assert cut and all(s.text.count(",") == 1 and not s.finished for s in cut)
    elif "min_new_tokens" in extra:  # the tiny model's solutions are shorter than 20: EOS was suppressed
        assert all(len(s.response_ids) >= 20 for s in ref)
        assert all(EOS not in s.response_ids[:20] for s in ref)
    else:
        assert any(s.finished and s.response_ids[-1] == EOS for s in ref)


def test_static_prompt_bucketing_keeps_greedy_outputs(tiny, monkeypatch):
    """On CUDA hf-static left-pads prompts to a multiple of 64 (fewer compiled shapes); the extra padding columns
    must not change a token. Forced here on CPU with a multiple of 16 (the tiny model has 64 positions)."""
    ref = run(tiny, "hf", greedy=True, num_samples=2)
    monkeypatch.setattr(rollout, "_static_pad_multiple", lambda device: 16)
    assert key(run(tiny, "hf-static", greedy=True, num_samples=2)) == key(ref)


@pytest.mark.parametrize("backend", BACKENDS)
def test_sampled_outputs_are_valid_and_end_where_they_should(tiny, backend):
    model, tok = tiny
    torch.manual_seed(0)
    samples = run(tiny, backend, num_samples=3, temperature=0.6, top_p=0.9, max_new_tokens=30, min_new_tokens=4,
                  stop_strings=[";"])
    assert len(samples) == 3 * len(PROMPTS)
    vocab = model.config.vocab_size
    for i, s in enumerate(samples):
        assert s.row == i // 3 and s.prompt_ids == tok(PROMPTS[s.row])["input_ids"]
        r = s.response_ids
        assert 1 <= len(r) <= 30 and all(0 <= t < vocab for t in r)
        assert EOS not in r[:-1] and tok.pad_token_id not in r, r  # EOS only last; no padding inside
        assert s.finished == (r[-1] == EOS)
        if s.finished:
            assert len(r) >= 5, "EOS sampled before min_new_tokens"
        assert s.text == tok.decode(r, skip_special_tokens=True)
        body = tok.decode(r[:-1] if s.finished else r, skip_special_tokens=True)
        assert ";" not in body[:-1], f"text runs past its stop string: {body!r}"
        if not s.finished and len(r) < 30:
            assert body.endswith(";"), f"stopped early without a stop string: {body!r}"
    # the sampling is real: three samples of one prompt are not all the same everywhere
    assert any(len({tuple(samples[3 * p + j].response_ids) for j in range(3)}) > 1 for p in range(len(PROMPTS)))


def test_checkpoint_generation_config_does_not_change_the_distribution(tiny, monkeypatch):
    """A checkpoint's own repetition_penalty / no_repeat_ngram_size / min_length (Qwen2.5-Instruct ships 1.05) would
    make the samples off-policy; generate ignores them (paged builds its own config, and greedy outputs agree across
    backends above), and a processor that cannot be switched off is refused."""
    model, tok = tiny
    ref = key(run(tiny, "hf", greedy=True))
    for name, value in (("repetition_penalty", 3.0), ("no_repeat_ngram_size", 2), ("min_length", 40)):
        monkeypatch.setattr(model.generation_config, name, value)
    assert key(run(tiny, "hf", greedy=True)) == ref
    torch.manual_seed(0)
    sampled = run(tiny, "hf", temperature=1.0)
    monkeypatch.undo()
    torch.manual_seed(0)
    assert key(run(tiny, "hf", temperature=1.0)) == key(sampled)
    monkeypatch.setattr(model.generation_config, "suppress_tokens", [5])
    with pytest.raises(ValueError, match="suppress_tokens=\\[5\\]"):
        run(tiny, "hf", greedy=True)


def test_fixed_length_rollouts(tiny):
    """min_new_tokens = max_new_tokens (how the benchmarks make every response full length), sampled."""
    for backend in BACKENDS:
        samples = run(tiny, backend, temperature=1.0, max_new_tokens=12, min_new_tokens=12)
        assert all(len(s.response_ids) == 12 and EOS not in s.response_ids for s in samples), backend


def test_stop_string_beginning_in_the_prompt():
    """As transformers' StopStringCriteria: a stop string may start in the prompt's tail but must end in the response;
    the response is cut after the token that completes it."""
    from sppo_fast.tiny import build_tokenizer

    tok = build_tokenizer()
    enc = lambda s: tok(s, add_special_tokens=False)["input_ids"]
    prompt = enc("1+2=\n")
    resp, finished = _cut(tok, prompt, enc("\n3;4\n\n") + [EOS], {EOS}, ["\n\n"])
    assert tok.decode(resp) == "\n" and not finished  # "\n" + "\n": completed by the first response token
    resp, finished = _cut(tok, enc("1+2="), enc("3;4\n\n5") + [EOS], {EOS}, ["\n\n"])
    assert tok.decode(resp) == "3;4\n\n" and not finished
    resp, finished = _cut(tok, prompt, enc("3;4") + [EOS, 0, 0], {EOS}, ["\n\n"])
    assert resp == enc("3;4") + [EOS] and finished  # EOS kept, padding after it dropped
    resp, finished = _cut(tok, prompt, enc("3;4") + [0, 0], {EOS}, None)
    assert resp == enc("3;4") and not finished


def test_backend_names_and_bad_arguments(tiny):
    model, tok = tiny
    assert resolve_backend("auto", "cpu") == rollout.AUTO_BACKEND["cpu"] == "hf"
    assert resolve_backend("auto", torch.device("cuda", 0)) in BACKENDS
    assert resolve_backend("paged", "cpu") == "paged"
    with pytest.raises(ValueError, match="rollout backend must be one of"):
        resolve_backend("vllm", "cpu")
    with pytest.raises(ValueError, match="min_new_tokens <= max_new_tokens"):
        generate(model, tok, PROMPTS, max_new_tokens=4, min_new_tokens=5)
    with pytest.raises(ValueError, match="temperature > 0"):
        generate(model, tok, PROMPTS, temperature=0.0)
    with pytest.raises(ValueError, match="num_samples"):
        generate(model, tok, PROMPTS, num_samples=0)
    no_pad = copy.deepcopy(tok)
    no_pad.pad_token = None
    with pytest.raises(ValueError, match="no pad token"):
        generate(model, no_pad, PROMPTS, greedy=True)


def test_stepper_routes_to_the_configured_backend(tiny, monkeypatch):
    from sppo_fast import train

    model, tok = tiny
    seen = []
    monkeypatch.setattr(train, "generate", lambda *a, **k: seen.append(k["backend"]) or [])
    for name, expected in (("auto", "hf"), ("paged", "paged"), ("hf-static", "hf-static")):
        args = train.Args(rollout_backend=name, max_new_tokens=8)
        train.Stepper(args, model, None, None, None, tok, torch.device("cpu")).generate(PROMPTS[:1])
        assert seen[-1] == expected
    with pytest.raises(ValueError, match="rollout backend"):
        train.Stepper(train.Args(rollout_backend="fast"), model, None, None, None, tok, torch.device("cpu"))


def test_autocast_reaches_the_paged_worker_thread():
    """generate_batch runs the forward in its own thread; autocast is thread-local, so the caller's must be carried."""
    class M(torch.nn.Module):
        device = torch.device("cpu")
        dtype = torch.bfloat16

        def forward(self, x):
            return torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu")

    m, seen = M(), []
    worker = lambda: seen.append(m(None))
    with torch.autocast("cpu", dtype=torch.bfloat16), _autocast_in_worker(m):
        t = threading.Thread(target=worker)
        t.start()
        t.join()
    t = threading.Thread(target=worker)  # restored afterwards
    t.start()
    t.join()
    assert seen == [(True, torch.bfloat16), (False, seen[1][1])]
    assert "forward" not in vars(m)


def test_paged_under_autocast_needs_weights_in_its_dtype(tiny):
    """fp32 weights under bf16 autocast (the trainer's default on CUDA): a clear error, not transformers' own
    from inside its worker thread; bf16 weights under bf16 autocast run."""
    model, tok = tiny
    with torch.autocast("cpu", dtype=torch.bfloat16), pytest.raises(ValueError, match="--memory-plan bf16"):
        generate(model, tok, PROMPTS[:2], backend="paged", greedy=True, max_new_tokens=4)
    bf16 = type(model)(model.config).to(torch.bfloat16)
    bf16.load_state_dict(model.state_dict())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        samples = generate(bf16, tok, PROMPTS[:2], backend="paged", greedy=True, max_new_tokens=4)
    assert [len(s.response_ids) for s in samples] == [4, 4]

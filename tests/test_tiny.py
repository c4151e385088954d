"""The embedded tiny model (sppo_fast/assets/tiny), its builder (sppo_fast.tiny) and the synthetic task."""
import json
import os
import random
from pathlib import Path

import pytest

from sppo_fast import synthetic

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from sppo_fast import tiny  # noqa: E402


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    # Everything here must work without a network: make any hub access fail loudly instead of hanging.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    # The model is tiny: one thread is as fast as two on an idle machine and far faster on a busy one.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def tok():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny.default_model_path())


@pytest.fixture(scope="module")
def model():
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny.default_model_path()).eval()


# ---------------------------------------------------------------------------------------------------------------
# synthetic task
# ---------------------------------------------------------------------------------------------------------------
def test_make_problem_format():
    rng = random.Random(0)
    for _ in range(200):
        p = synthetic.make_problem(rng)
        assert set(p) >= {"prompt", "answer", "solution"}
        assert p["prompt"].endswith("=")
        terms = [int(t) for t in p["prompt"][:-1].split("+")]
        assert 2 <= len(terms) <= 4
        assert p["answer"] == str(sum(terms))
        steps, ans = p["solution"].split(";")
        assert ans == p["answer"]
        assert len(steps.split(",")) == len(terms) - 1
        acc = terms[0]
        for step, t in zip(steps.split(","), terms[1:]):
            assert step == f"{acc}+{t}={acc + t}"
            acc += t
        assert synthetic.is_correct(p["solution"], p["answer"])
        assert len(p["solution"]) <= synthetic.max_solution_chars()


def test_make_problem_example_and_kwargs():
    p = synthetic.make_problem(random.Random(1), min_terms=3, max_terms=3, max_first=9, max_operand=3)
    assert p["prompt"].count("+") == 2
    with pytest.raises(ValueError):
        synthetic.make_problem(random.Random(0), min_terms=1)


def test_extract_answer_and_is_correct():
    ex = synthetic.extract_answer
    assert ex("27+2=29,29+5=34;34") == "34"
    assert ex("27+2=29,29+5=34; 34 ") == "34"
    assert ex("1+2=3;3</s>") == "3"
    assert ex("1+2=3;3</s><pad><pad>") == "3"
    assert ex("1+2=3;3\n;9") == "3"  # nothing after a newline counts
    assert ex("1+2=3;4;3") == "3"  # the last ';' wins
    assert ex("1+2=3,3+4=7") is None
    assert ex("") is None
    assert synthetic.is_correct("27+2=29,29+5=34;34", "34")
    assert synthetic.is_correct("garbage;34", " 34")
    assert not synthetic.is_correct("27+2=29,29+5=34;35", "34")
    assert not synthetic.is_correct("27+2=29,29+5=34;", "34")
    assert not synthetic.is_correct("27+2=29,29+5=34", "34")
    assert not synthetic.is_correct("1+2=3;34x", "34")


def test_datasets_deterministic_and_disjoint():
    a = synthetic.make_dataset(50, seed=7)
    assert a == synthetic.make_dataset(50, seed=7)
    assert a != synthetic.make_dataset(50, seed=8)
    u = synthetic.make_dataset(300, seed=7, unique=True)
    assert len({p["prompt"] for p in u}) == 300
    train, held = synthetic.train_eval_datasets(3000, 300)
    assert (len(train), len(held)) == (3000, 300)
    assert len({p["prompt"] for p in held}) == 300
    assert not {p["prompt"] for p in train} & {p["prompt"] for p in held}
    assert (train, held) == synthetic.train_eval_datasets(3000, 300)
    assert synthetic.TRAIN_SEED != synthetic.EVAL_SEED
    # all chain lengths are present in both
    assert {p["prompt"].count("+") for p in train} == {p["prompt"].count("+") for p in held} == {1, 2, 3}
    with pytest.raises(ValueError):
        synthetic.make_dataset(50, seed=0, unique=True, min_terms=2, max_terms=2, max_first=2, max_operand=2)


# ---------------------------------------------------------------------------------------------------------------
# shipped tokenizer / model
# ---------------------------------------------------------------------------------------------------------------
def test_shipped_files():
    d = Path(tiny.default_model_path())
    for f in ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
              "tokenizer_config.json"):
        assert (d / f).is_file(), f
    total = sum(f.stat().st_size for f in d.iterdir() if f.is_file())
    assert total < 8 * 2**20
    gen = json.loads((d / "generation_config.json").read_text())
    assert gen["eos_token_id"] == 2 and gen["pad_token_id"] == 0


def test_tokenizer_roundtrip(tok):
    assert tok.eos_token_id is not None and tok.pad_token_id is not None and tok.bos_token_id is not None
    assert len({tok.eos_token_id, tok.pad_token_id, tok.bos_token_id}) == 3
    assert len(tok) <= 64
    rng = random.Random(0)
    samples = ["27+2+5=", "27+2=29,29+5=34;34", "0", "a b\nc;  d", "-3*4=12,x"]
    samples += [p["prompt"] + p["solution"] for p in synthetic.make_dataset(50, 3)]
    for s in samples:
        ids = tok(s, add_special_tokens=False)["input_ids"]
        assert len(ids) == len(s)  # one token per character
        assert tok.decode(ids) == s
        with_bos = tok(s)["input_ids"]
        assert with_bos[0] == tok.bos_token_id and with_bos[1:] == ids
        assert tok.decode(with_bos, skip_special_tokens=True) == s
    ids = tok("1+2=3;3", add_special_tokens=False)["input_ids"] + [tok.eos_token_id, tok.pad_token_id]
    assert tok.decode(ids, skip_special_tokens=True) == "1+2=3;3"
    assert synthetic.is_correct(tok.decode(ids), "3")


@pytest.mark.parametrize("side", ["left", "right"])
def test_tokenizer_padding(tok, side):
    old = tok.padding_side
    tok.padding_side = side
    try:
        enc = tok(["1+2=", "11+22+3="], padding=True, return_tensors="pt")
    finally:
        tok.padding_side = old
    ids, att = enc["input_ids"], enc["attention_mask"]
    assert ids.shape == att.shape == (2, 9)
    assert att[1].all() and att[0].sum() == 5
    short = ids[0][att[0].bool()].tolist()
    assert short == tok("1+2=")["input_ids"]
    pad_pos = 0 if side == "left" else -1
    assert ids[0, pad_pos] == tok.pad_token_id and att[0, pad_pos] == 0


def test_model_config(model):
    from transformers import LlamaForCausalLM

    assert isinstance(model, LlamaForCausalLM)
    n = sum(p.numel() for p in model.parameters())
    assert 0.5e6 <= n <= 1.5e6
    assert model.config.max_position_embeddings >= 1 + 9 + synthetic.max_solution_chars() + 1
    assert model.generation_config.eos_token_id == 2 and model.generation_config.pad_token_id == 0


def test_batched_left_padded_generation(tok, model):
    held = synthetic.train_eval_datasets(0, 32)[1]
    old = tok.padding_side
    tok.padding_side = "left"
    try:
        enc = tok([p["prompt"] for p in held], return_tensors="pt", padding=True)
    finally:
        tok.padding_side = old
    with torch.no_grad():
        out = model.generate(**enc, do_sample=False, max_new_tokens=synthetic.max_solution_chars() + 2,
                             pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    texts = tok.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    assert len(texts) == 32 and all(isinstance(t, str) for t in texts)
    acc = sum(synthetic.is_correct(t, p["answer"]) for t, p in zip(texts, held)) / len(held)
    # the shipped checkpoint is deliberately half-trained: it solves some problems, not most
    assert 0.05 <= acc <= 0.75, acc
    # most completions have the right shape (steps, ';', answer) even when wrong
    assert sum(synthetic.extract_answer(t) is not None for t in texts) >= 24
    # a left-padded batch agrees with unpadded generation for one prompt
    one = tok(held[0]["prompt"], return_tensors="pt")
    with torch.no_grad():
        o1 = model.generate(**one, do_sample=False, max_new_tokens=synthetic.max_solution_chars() + 2,
                            pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    assert tok.decode(o1[0, one["input_ids"].shape[1]:], skip_special_tokens=True) == texts[0]


def test_default_model_path():
    p = Path(tiny.default_model_path())
    assert p.name == "tiny" and p.parent.name == "assets" and p.parent.parent.name == "sppo_fast"


# ---------------------------------------------------------------------------------------------------------------
# builder
# ---------------------------------------------------------------------------------------------------------------
def test_build_deterministic(tmp_path):
    kw = dict(steps=3, seed=0, batch_size=8, n_train=64, n_eval=8, do_eval=False, verbose=False)
    m1 = tiny.build(tmp_path / "a", **kw)
    m2 = tiny.build(tmp_path / "b", **kw)
    assert m1["final_loss"] == m2["final_loss"]
    a = (tmp_path / "a" / "model.safetensors").read_bytes()
    b = (tmp_path / "b" / "model.safetensors").read_bytes()
    assert a == b
    for f in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"):
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes(), f
    assert 0.5e6 <= m1["n_params"] <= 1.5e6
    # the seed matters (initialisation)
    tok = tiny.build_tokenizer()
    w0 = tiny.build_model(tok, 0).model.embed_tokens.weight
    w1 = tiny.build_model(tok, 1).model.embed_tokens.weight
    assert not torch.equal(w0, w1)
    # what it writes loads with the Auto classes
    from transformers import AutoModelForCausalLM, AutoTokenizer

    AutoModelForCausalLM.from_pretrained(tmp_path / "a")
    t = AutoTokenizer.from_pretrained(tmp_path / "a")
    assert t.decode(t("12+3=", add_special_tokens=False)["input_ids"]) == "12+3="


# ---------------------------------------------------------------------------------------------------------------
# the horizon knob
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("horizon,lo,hi", [(20, 15, 25), (60, 50, 70), (150, 130, 170)])
def test_horizon_response_lengths(horizon, lo, hi):
    task = synthetic.task_for_horizon(horizon)
    probs = synthetic.make_dataset(1000, seed=5, **task)
    lengths = [len(p["solution"]) + 1 for p in probs]  # character-level tokens + EOS
    assert lo <= sum(lengths) / len(lengths) <= hi
    assert max(lengths) <= synthetic.max_solution_chars(**task) + 1
    for p in probs[:50]:  # the same family: a correct chain of additions at every horizon
        terms = [int(t) for t in p["prompt"][:-1].split("+")]
        assert task["min_terms"] <= len(terms) <= task["max_terms"] and p["answer"] == str(sum(terms))
        assert synthetic.is_correct(p["solution"], p["answer"])


def test_horizon_lookup():
    assert synthetic.task_for_horizon(20) == synthetic.DEFAULT_TASK
    t = synthetic.task_for_horizon(60)
    t["max_terms"] = 99  # a copy: the table is not mutated
    assert synthetic.HORIZONS[60]["max_terms"] != 99
    with pytest.raises(ValueError, match="horizon"):
        synthetic.task_for_horizon(100)


def test_write_jsonl_split_loads_in_the_trainer(tmp_path):
    from sppo_fast import data, rewards

    task = synthetic.task_for_horizon(60)
    tr, ev = synthetic.write_jsonl_split(tmp_path, 200, 20, **task)
    train, held = data.load_dataset(tr, eval_path=ev)
    ref_train, ref_held = synthetic.train_eval_datasets(200, 20, **task)
    assert [r["prompt"] for r in train] == [p["prompt"] for p in ref_train]
    assert [r["answer"] for r in held] == [p["answer"] for p in ref_held]
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in held}
    fn = rewards.get_reward_fn("exact")
    assert fn([r["prompt"] for r in held], [p["solution"] for p in ref_held], answer=[r["answer"] for r in held]) \
        == [1.0] * 20


def test_max_positions_fit_each_horizon():
    assert tiny.max_positions() == tiny.max_positions(synthetic.DEFAULT_TASK) == 64
    for h in (60, 150):
        task = synthetic.task_for_horizon(h)
        rng = random.Random(0)
        longest = max(len(p["prompt"]) + len(p["solution"]) for p in (synthetic.make_problem(rng, **task)
                                                                      for _ in range(3000)))
        assert tiny.max_positions(task) >= 1 + longest + 1  # BOS + prompt + solution + EOS


def test_build_other_horizon(tmp_path):
    kw = dict(steps=2, seed=0, batch_size=4, n_train=32, n_eval=4, do_eval=False, verbose=False, horizon=60)
    m = tiny.build(tmp_path / "h60", **kw)
    assert m["horizon"] == 60 and m["task"] == synthetic.task_for_horizon(60)
    tiny.build(tmp_path / "h60b", **kw)
    assert (tmp_path / "h60" / "model.safetensors").read_bytes() == (tmp_path / "h60b" / "model.safetensors").read_bytes()
    cfg = json.loads((tmp_path / "h60" / "config.json").read_text())
    assert cfg["max_position_embeddings"] == tiny.max_positions(synthetic.task_for_horizon(60)) > 64
    gen = json.loads((tmp_path / "h60" / "generation_config.json").read_text())
    assert gen["max_new_tokens"] == synthetic.max_solution_chars(**synthetic.task_for_horizon(60)) + 2
    with pytest.raises(ValueError, match="out_dir"):
        tiny.build(None, **kw)
    with pytest.raises(SystemExit):
        tiny.main(["--horizon", "150"])  # only the horizon-20 model is shipped: another needs --out
    assert set(tiny.HORIZON_STEPS) == set(synthetic.HORIZONS) and tiny.HORIZON_STEPS[20] == tiny.DEFAULT_STEPS


def test_build_stops_at_accuracy(tmp_path):
    kw = dict(seed=0, batch_size=4, n_train=32, n_eval=4, do_eval=False, verbose=False, horizon=60, check_n=4)
    m = tiny.build(tmp_path / "a", steps=5, stop_at_acc=0.0, check_every=2, **kw)  # any accuracy is >= 0
    assert m["stopped_at"] == m["steps"] == 2 and m["max_steps"] == 5 and len(m["history"]) == 1
    m = tiny.build(tmp_path / "b", steps=3, stop_at_acc=1.01, check_every=1, **kw)  # never reached: the cap
    assert m["stopped_at"] is None and m["steps"] == 3 and len(m["history"]) == 3

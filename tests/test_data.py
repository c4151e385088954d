"""Dataset loading, splitting, prompt formatting/filtering and the resumable PromptSampler (CPU, offline)."""
import json

import pytest

from sppo_fast import data as D


def write_jsonl(path, rows, extra_lines=()):
    lines = [json.dumps(r) for r in rows] + list(extra_lines)
    path.write_text("\n".join(lines) + "\n")
    return path


ROWS = [{"question": f"What is {i} + {i}?", "answer": f"#### {2 * i}", "id": i} for i in range(20)]


# ----------------------------------------------------------------------------------------------------------------
# load_rows


def test_jsonl_keeps_all_columns_and_skips_blank_lines(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(ROWS[0]) + "\n\n   \n" + json.dumps(ROWS[1]) + "\n")
    rows = D.load_rows(path, prompt_field="question")
    assert rows == ROWS[:2]


def test_jsonl_bad_line_names_file_and_line(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", ROWS[:2], extra_lines=["", '{"question": "x", answer: 1}'])
    with pytest.raises(ValueError, match=r"d\.jsonl line 4: invalid JSON"):
        D.load_rows(path, prompt_field="question")


def test_jsonl_missing_field_names_line_field_and_present_fields(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [ROWS[0], {"question": "q", "id": 9}])
    msg = r"d\.jsonl line 2: missing field 'answer' \(fields present: \['id', 'question'\]\)"
    with pytest.raises(ValueError, match=msg):
        D.load_rows(path, prompt_field="question")
    # a code dataset without answers loads once 'answer' is not required
    assert len(D.load_rows(path, prompt_field="question", required=("question",))) == 2


def test_non_object_and_non_string_prompt(tmp_path):
    with pytest.raises(ValueError, match="line 1: expected a JSON object, got list"):
        D.load_rows(write_jsonl(tmp_path / "a.jsonl", [[1, 2]]))
    with pytest.raises(ValueError, match="line 1: field 'prompt' must be a string, got int"):
        D.load_rows(write_jsonl(tmp_path / "b.jsonl", [{"prompt": 3, "answer": "3"}]))


def test_empty_and_missing_files(tmp_path):
    for name in ["empty.jsonl", "empty.json"]:
        (tmp_path / name).write_text("\n\n")
        with pytest.raises(ValueError, match=f"{name}: dataset is empty"):
            D.load_rows(tmp_path / name)
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        D.load_rows(tmp_path / "nope.jsonl")
    with pytest.raises(ValueError, match="unknown dataset format '.csv'"):
        (tmp_path / "d.csv").write_text("a,b\n")
        D.load_rows(tmp_path / "d.csv")


def test_json_list(tmp_path):
    path = tmp_path / "d.json"
    path.write_text(json.dumps(ROWS[:3]))
    assert D.load_rows(path, prompt_field="question") == ROWS[:3]
    path.write_text(json.dumps([ROWS[0], {"question": "q"}]))
    with pytest.raises(ValueError, match=r"d\.json row 1 \(0-based\): missing field 'answer'"):
        D.load_rows(path, prompt_field="question")


def test_parquet(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    path = tmp_path / "d.parquet"
    pq.write_table(pa.Table.from_pylist(ROWS[:5]), path)
    assert D.load_rows(path, prompt_field="question") == ROWS[:5]
    pq.write_table(pa.Table.from_pylist([ROWS[0], {"question": "q", "answer": None, "id": 1}]), path)
    with pytest.raises(ValueError, match=r"row 1 \(0-based\): field 'answer' is null"):
        D.load_rows(path, prompt_field="question")


def test_parquet_without_pyarrow_says_how_to_install(tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "pyarrow", None)  # makes `import pyarrow...` raise ImportError
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    (tmp_path / "d.parquet").write_bytes(b"PAR1")
    with pytest.raises(ImportError, match="pip install pyarrow"):
        D.load_rows(tmp_path / "d.parquet")


# ----------------------------------------------------------------------------------------------------------------
# load_dataset


def test_field_mapping_and_deterministic_split(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", ROWS)
    train, evals = D.load_dataset(str(path), prompt_field="question", eval_fraction=0.25, seed=3)
    assert (len(train), len(evals)) == (15, 5)
    assert all(r["prompt"] == r["question"] and r["answer"] == ROWS[r["id"]]["answer"] for r in train + evals)
    assert sorted(r["id"] for r in train + evals) == list(range(20))
    again = D.load_dataset(str(path), prompt_field="question", eval_fraction=0.25, seed=3)
    assert again == (train, evals)
    other = D.load_dataset(str(path), prompt_field="question", eval_fraction=0.25, seed=4)
    assert [r["id"] for r in other[1]] != [r["id"] for r in evals]
    assert [r["id"] for r in train] == sorted(r["id"] for r in train)  # file order kept
    _, evals_n = D.load_dataset(str(path), prompt_field="question", eval_fraction=4, seed=3)
    assert len(evals_n) == 4
    with pytest.raises(ValueError, match="leaves no training rows"):
        D.load_dataset(str(path), prompt_field="question", eval_fraction=20)


def test_eval_path_and_answer_field(tmp_path):
    rows = [{"problem": r["question"], "solution": r["answer"]} for r in ROWS]
    train_p = write_jsonl(tmp_path / "train.jsonl", rows[:15])
    eval_p = write_jsonl(tmp_path / "eval.jsonl", rows[15:])
    train, evals = D.load_dataset(str(train_p), eval_path=eval_p, prompt_field="problem", answer_field="solution")
    assert len(train) == 15 and len(evals) == 5
    assert evals[0] == {"problem": rows[15]["problem"], "solution": rows[15]["solution"],
                        "prompt": rows[15]["problem"], "answer": rows[15]["solution"]}


def test_synthetic_dataset():
    train, evals = D.load_dataset("synthetic", synthetic_n_train=30, synthetic_n_eval=10)
    assert len(train) == 30 and len(evals) == 10
    assert all({"prompt", "answer", "solution"} <= set(r) for r in train + evals)
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in evals}


# ----------------------------------------------------------------------------------------------------------------
# prompts (a tiny offline tokenizer)


def tiny_tokenizer(chat_template=True):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<unk>", "<s>", "</s>", "<|system|>", "<|user|>", "<|assistant|>"] + "what is 1 + 2 ? be brief".split()
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    if chat_template:
        hf.chat_template = ("{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} </s> {% endfor %}"
                            "{% if add_generation_prompt %}<|assistant|> {% endif %}")
    return hf


def test_format_prompts_chat_and_raw():
    tok = tiny_tokenizer()
    rows = [{"prompt": "what is 1 + 2 ?", "answer": "3"}]
    assert D.format_prompts(rows, tok, chat_template=True) == ["<|user|> what is 1 + 2 ? </s> <|assistant|> "]
    assert D.format_prompts(rows, tok, chat_template=True, system_prompt="be brief") == [
        "<|system|> be brief </s> <|user|> what is 1 + 2 ? </s> <|assistant|> "]
    assert D.format_prompts(rows, tok, chat_template=False) == ["what is 1 + 2 ?"]
    assert D.format_prompts(["x"], tok, chat_template=False, system_prompt="be brief") == ["be brief\n\nx"]


def test_format_prompts_without_chat_template_suggests_flag():
    with pytest.raises(ValueError, match="no chat template.*--no-chat-template"):
        D.format_prompts([{"prompt": "hi"}], tiny_tokenizer(chat_template=False), chat_template=True)


def test_filter_long_prompts_counts_skips():
    tok = tiny_tokenizer()
    rows = [{"prompt": " ".join(["1"] * n), "answer": "x"} for n in (2, 5, 9, 4)]
    kept, skipped = D.filter_long_prompts(rows, tok, max_prompt_tokens=5)
    assert [len(r["prompt"].split()) for r in kept] == [2, 5, 4] and skipped == 1
    # the chat template adds 3 tokens around the user turn, and lengths are measured on what the policy sees
    kept, skipped = D.filter_long_prompts(rows, tok, max_prompt_tokens=7, chat_template=True)
    assert [len(r["prompt"].split()) for r in kept] == [2, 4] and skipped == 2
    with pytest.raises(ValueError, match="all 4 prompts are longer than 1 tokens"):
        D.filter_long_prompts(rows, tok, max_prompt_tokens=1)


# ----------------------------------------------------------------------------------------------------------------
# PromptSampler


def test_sampler_covers_each_epoch_and_reshuffles():
    s = D.PromptSampler(10, batch_size=4, seed=0)
    stream = sum((s.next_batch() for _ in range(5)), [])  # 20 indices = exactly 2 epochs
    assert sorted(stream[:10]) == list(range(10)) and sorted(stream[10:]) == list(range(10))
    assert stream[:10] != stream[10:]
    assert D.PromptSampler(10, 4, seed=1).next_batch() != D.PromptSampler(10, 4, seed=0).next_batch()
    assert len(D.PromptSampler(3, 7, seed=0).next_batch()) == 7  # batch larger than the dataset


@pytest.mark.parametrize("stop_after", [0, 1, 2, 3, 7])
def test_sampler_resume_draws_the_same_batches(stop_after):
    full = D.PromptSampler(10, batch_size=4, seed=5)
    expected = [full.next_batch() for _ in range(12)]

    first = D.PromptSampler(10, batch_size=4, seed=5)
    got = [first.next_batch() for _ in range(stop_after)]
    state = json.loads(json.dumps(first.state_dict()))  # survives a JSON checkpoint
    resumed = D.PromptSampler(10, batch_size=4, seed=5)
    resumed.load_state_dict(state)
    got += [resumed.next_batch() for _ in range(12 - stop_after)]
    assert got == expected


def test_sampler_rejects_state_from_another_dataset():
    state = D.PromptSampler(10, 4, seed=0).state_dict()
    with pytest.raises(ValueError, match="n_rows=10.*n_rows=11"):
        D.PromptSampler(11, 4, seed=0).load_state_dict(state)

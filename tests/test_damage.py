"""Issue 23, items 3, 5 and 6: a bad model directory's tokenizer is refused before anything is written; a
checkpoint damaged at the same size is skipped for the previous good one; --eval-size fractions and the small-train
guard, flat learning curves in `plot`, negative numbers in both flag forms, reward-signature and critic-load
messages, and docs that point only at what is in the repository.

The damage is real: bytes of model.safetensors overwritten in place (NaN at the same size, flipped bits), and the
resume is a subprocess run of the CLI, as a user runs it."""
import json
import logging
import re
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sppo_fast import checkpoint
from sppo_fast.cli import build_args
from sppo_fast.cli import main as cli_main
from sppo_fast.metrics import panel_keys, plot
from sppo_fast.prepare import preflight
from sppo_fast.tiny import default_model_path

REPO = Path(__file__).resolve().parent.parent
FAST = ["--batch-size", "4", "--eval-size", "4", "--eval-k", "1", "--eval-every", "0", "--max-new-tokens", "8",
        "--no-progress", "--threads", "1", "--no-tensorboard"]


def one_line_error(capsys, rc, tmp_path, *fragments):
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1, err
    for fragment in fragments:
        assert fragment in err[0], err[0]
    assert not (tmp_path / "runs").exists()  # nothing written
    return err[0]


# --- item 3: the tokenizer is checked before anything is written -----------------------------------------------------
def tiny_copy(tmp_path, name, damage):
    model = tmp_path / name
    shutil.copytree(default_model_path(), model)
    damage(model)
    return model


def edit_json(path, **changes):
    data = json.loads(path.read_text())
    for key, value in changes.items():
        data.pop(key, None) if value is None else data.__setitem__(key, value)
    path.write_text(json.dumps(data))


def _no_eos(model):
    for name in ("tokenizer_config.json", "generation_config.json", "config.json"):
        edit_json(model / name, eos_token=None, eos_token_id=None)


def _empty_vocab(model):
    data = json.loads((model / "tokenizer.json").read_text())
    data["model"]["vocab"], data["added_tokens"] = {}, []
    (model / "tokenizer.json").write_text(json.dumps(data))


def _llama_class_without_vocab(model):  # transformers 5 builds an empty tokenizer from tokenizer_config.json alone
    (model / "tokenizer.json").unlink()
    edit_json(model / "tokenizer_config.json", tokenizer_class="LlamaTokenizer")


@pytest.mark.parametrize("damage, fragments", [
    (lambda m: [p.unlink() for p in m.glob("tokenizer*")], ["has no tokenizer files", "tokenizer.save_pretrained"]),
    (_llama_class_without_vocab, ["has an empty vocabulary", "copy the tokenizer files"]),
    (_empty_vocab, ["has an empty vocabulary"]),
    (lambda m: (m / "tokenizer.json").write_text(""), ["does not load (JSONDecodeError", "copy the tokenizer files"]),
    (_no_eos, ["no EOS token", "set eos_token in tokenizer_config.json or eos_token_id in generation_config.json"]),
    (lambda m: edit_json(m / "config.json", vocab_size=32), ["token ids up to 53", "embeds only 32",
                                                             "belongs to another model"]),
], ids=["no-files", "class-only", "empty-vocab", "empty-file", "no-eos", "vocab-larger-than-embedding"])
def test_bad_tokenizer_is_one_line_exit_2_and_no_run_dir(tmp_path, capsys, damage, fragments):
    model = tiny_copy(tmp_path, "model", damage)
    rc = cli_main(["train", "--preset", "tiny", "--model", str(model), *FAST, "--out-dir", str(tmp_path / "runs")])
    one_line_error(capsys, rc, tmp_path, "sppo-fast train: error: --model", *fragments)


# --- item 5: digests and non-finite weights; resume falls back to the previous good checkpoint -----------------------
def tensor_span(path: Path, name: str | None = None) -> tuple[int, int, str]:
    """(start, end, dtype) of a tensor's bytes in a safetensors file (the first floating one when no name)."""
    raw = path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + n])
    key = name or next(k for k, v in header.items() if k != "__metadata__" and v["dtype"] in ("F32", "F16", "BF16"))
    start, end = header[key]["data_offsets"]
    return 8 + n + start, 8 + n + end, header[key]["dtype"]


def overwrite_with_nan(path: Path) -> None:
    start, end, dtype = tensor_span(path)
    assert dtype == "F32"
    with open(path, "r+b") as f:  # in place: same size, header intact
        f.seek(start)
        f.write(struct.pack("<f", float("nan")) * ((end - start) // 4))


def flip_bytes(path: Path, at: int, count: int = 4) -> None:
    with open(path, "r+b") as f:
        f.seek(at)
        old = f.read(count)
        f.seek(at)
        f.write(bytes(b ^ 0xFF for b in old))


def test_resume_skips_checkpoints_damaged_at_the_same_size(tmp_path, capsys):
    run = tmp_path / "run"
    assert cli_main(["train", *FAST, "--steps", "3", "--save-every", "1", "--keep-last", "3", "--out-dir",
                     str(tmp_path), "--run-name", "run"]) == 0
    step1, step2, step3 = checkpoint.list_checkpoints(run)
    manifest = json.loads((step1 / "manifest.json").read_text())
    assert manifest["digest"] == "sha256" and set(manifest["digests"]) == set(manifest["files"])
    assert manifest["digests"]["trainer.safetensors"] == checkpoint.file_digest(step1 / "trainer.safetensors")

    sizes = {p: p.stat().st_size for p in (step3 / "policy" / "model.safetensors", step2 / "trainer.safetensors")}
    overwrite_with_nan(step3 / "policy" / "model.safetensors")  # weights NaN, at the same size
    start, end, _ = tensor_span(step2 / "trainer.safetensors", "optim.0.exp_avg")
    flip_bytes(step2 / "trainer.safetensors", (start + end) // 2)  # four bytes of an optimizer state flipped
    assert {p: p.stat().st_size for p in sizes} == sizes
    assert "policy/model.safetensors does not match its sha256 digest" in checkpoint.verify(step3)

    # a checkpoint without digests (as written before them) is still refused for its NaN weights
    shutil.copytree(step3, tmp_path / "step_000009")
    old = json.loads((step3 / "manifest.json").read_text())
    del old["digests"], old["digest"]
    (tmp_path / "step_000009" / "manifest.json").write_text(json.dumps(old))
    assert re.fullmatch(r"policy/model\.safetensors holds NaN/inf values \(tensor '.+'\)",
                        checkpoint.verify(tmp_path / "step_000009"))

    out = subprocess.run([sys.executable, "-m", "sppo_fast.cli", "train", *FAST, "--steps", "4", "--resume", str(run)],
                         capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    skipped = [line for line in out.stdout.splitlines() if line.startswith("--resume: skipped")]
    assert len(skipped) == 2, out.stdout
    assert "step_000003: policy/model.safetensors does not match its sha256 digest" in skipped[0]
    assert "step_000002: trainer.safetensors does not match its sha256 digest" in skipped[1]
    assert "step_000001 at step 1" in out.stdout
    assert [c.name for c in checkpoint.list_checkpoints(run)] == ["step_000002", "step_000003", "step_000004"]
    assert all(checkpoint.verify(c) is None for c in checkpoint.list_checkpoints(run))

    # every checkpoint damaged: a clear error naming each, nothing trained
    for ckpt in checkpoint.list_checkpoints(run):
        overwrite_with_nan(ckpt / "value_head.safetensors")
    capsys.readouterr()
    rc = cli_main(["train", *FAST, "--steps", "5", "--resume", str(run)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and f"no checkpoint in {run} verifies" in err[0], err
    assert err[0].count("value_head.safetensors does not match its sha256 digest") == 3


# --- item 6: --eval-size as a fraction or a count; the small-train guard ---------------------------------------------
def test_eval_size_fraction_or_count_and_small_train_guard(tmp_path, capsys):
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"{i % 9}+1=", "answer": str(i % 9 + 1)}) + "\n"
                            for i in range(300)))
    flags = ["--preset", "tiny", *FAST, "--data", str(data), "--out-dir", str(tmp_path / "runs")]
    rc = cli_main(["train", *flags, "--eval-size", "256"])
    one_line_error(capsys, rc, tmp_path, "--eval-size 256 holds out 256 of the 300 rows",
                   "leaving 44 (less than half) for training", "--allow-small-train")
    cpu = torch.device("cpu")
    pre = preflight(build_args([*flags, "--eval-size", "0.1"]), cpu)
    assert (len(pre.train_rows), len(pre.eval_rows)) == (270, 30)
    pre = preflight(build_args([*flags, "--eval-size", "256", "--allow-small-train"]), cpu)
    assert (len(pre.train_rows), len(pre.eval_rows)) == (44, 256)
    rc = cli_main(["train", *flags, "--eval-size", "2.5"])
    one_line_error(capsys, rc, tmp_path, "--eval-size must be a whole number of rows or a fraction in (0, 1)")


# --- item 6: plot keeps flat learning curves -------------------------------------------------------------------------
def test_plot_keeps_flat_accuracy_and_reward(tmp_path):
    rows = [{"step": s, "reward/mean": 0.0, "eval/pass@1": 0.0, "eval/avg@4": 0.0, "stats/clipfrac": 0.0,
             "losses/policy": 0.1 * s} for s in range(4)]
    assert panel_keys(rows) == ["eval/pass@1", "eval/avg@4", "reward/mean", "losses/policy"]
    flat = [{k: v for k, v in r.items() if k != "losses/policy"} for r in rows]  # nothing changes at all
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in flat))
    assert plot(tmp_path).is_file()


# --- item 6: negative numbers parse in both flag forms ---------------------------------------------------------------
@pytest.mark.parametrize("flags, message", [
    (["--lr", "-1e-5"], "--lr must be in [0, inf), got -1e-05"),
    (["--lr=-1e-5"], "--lr must be in [0, inf), got -1e-05"),
    (["--value-lr", "-.5"], "--value-lr must be in [0, inf), got -0.5"),
    (["--temperature", "-inf"], "--temperature must be a finite number, got -inf"),
    (["--seed", "-3"], "--seed must be in [0, inf), got -3"),
])
def test_negative_numbers_get_the_range_message(tmp_path, capsys, flags, message):
    rc = cli_main(["train", *flags, "--out-dir", str(tmp_path / "runs")])
    assert one_line_error(capsys, rc, tmp_path).endswith(message)


def test_negative_values_that_are_valid_parse_in_the_space_form():
    args = build_args(["--value-layer", "-2", "--run-name", "x", "--stop-strings", "-1"])
    assert args.value_layer == -2 and args.stop_strings == ["-1"]


# --- item 6: a TRL-style reward is told how the CLI calls rewards ----------------------------------------------------
@pytest.mark.parametrize("signature, why", [
    ("completions, **kwargs", "too many positional arguments"),
    ("completions, solution, **kwargs", "multiple values for argument 'solution'"),  # synthetic rows have one
    ("completions, prompts=None, **kwargs", "parameter 'prompts' is in position 2, so it would receive the completions"),
    ("prompts, completions, completion_ids, **kwargs", "missing a required argument: 'completion_ids'"),
])
def test_trl_style_reward_gets_the_call_convention(tmp_path, capsys, signature, why):
    plugin = tmp_path / "r.py"
    plugin.write_text(f"def fn({signature}):\n    return [0.0] * len(completions)\n")
    rc = cli_main(["train", *FAST, "--reward", f"{plugin}:fn", "--out-dir", str(tmp_path / "runs")])
    one_line_error(capsys, rc, tmp_path, why, "calls a reward as fn(prompts, completions, **columns)")


# --- item 6: loading a critic's decoder from a causal LM is quiet; a real load problem is not ------------------------
def test_critic_load_drops_only_the_expected_lm_head_report(tmp_path, caplog):
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM

    from sppo_fast.model import load_critic

    lm = AutoModelForCausalLM.from_pretrained(default_model_path())
    lm.config.tie_word_embeddings = False  # an untied lm_head: stored in the file, unused by the critic's decoder
    lm.lm_head.weight = torch.nn.Parameter(lm.lm_head.weight.detach().clone())
    lm.save_pretrained(tmp_path / "untied")
    caplog.set_level(logging.WARNING)
    # transformers' loggers do not propagate to the root logger that caplog watches (unless an earlier test turned
    # propagation on): listen on transformers' own logger, so the test does not depend on the order it runs in
    hf_log = logging.getLogger("transformers")
    hf_log.addHandler(caplog.handler)
    try:
        load_critic(tmp_path / "untied", device=torch.device("cpu"), attn_implementation="sdpa")
        assert "LOAD REPORT" not in caplog.text
        weights = load_file(tmp_path / "untied" / "model.safetensors")
        del weights["model.layers.0.mlp.up_proj.weight"]
        save_file(weights, tmp_path / "untied" / "model.safetensors", metadata={"format": "pt"})
        load_critic(tmp_path / "untied", device=torch.device("cpu"), attn_implementation="sdpa")
    finally:
        hf_log.removeHandler(caplog.handler)
    assert "LOAD REPORT" in caplog.text and "MISSING" in caplog.text


# --- item 6: docs point only at what the repository holds, and install lines that work --------------------------------
def test_docs_point_inside_the_repository_and_install_from_the_checkout():
    texts = {p: p.read_text() for p in [REPO / "README.md", *sorted((REPO / "sppo_fast").rglob("*.py"))]}
    for path, text in texts.items():
        assert not re.search(r"\.\./(shared|DESIGN\.md)", text), path
        assert not re.search(r"pip install ['\"]?sppo_fast\[", text), path  # not on an index: `pip install -e ".[x]"`

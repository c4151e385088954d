"""Checkpoints: safetensors only, written atomically, the last K kept, resumable exactly.

Layout of RUN_DIR/checkpoints/step_000123/:
  policy/            save_pretrained (safetensors) of the policy, or the LoRA adapter, plus the tokenizer
  critic/            the separate critic LLM's decoder, when there is one (PPO, or SPPO with --critic)
  value_head.safetensors
  trainer.safetensors optimizer state tensors, RNG states; JSON metadata: step, param groups, scheduler, sampler
  manifest.json      every file's size and SHA-256, written last: `verify` checks them, every safetensors header,
                     and that every floating tensor is finite
The directory is written as step_000123.tmp and renamed into place, so a crash never leaves a half checkpoint
under a final name; `--resume RUN_DIR` takes the newest checkpoint that verifies (a disk that filled up or a copy
that was cut short shows as a size mismatch or a truncated safetensors file; bytes changed at the same size, as a
digest mismatch; weights that are NaN/inf, as non-finite) and says which ones it skipped and why.
"""
import contextlib
import hashlib
import json
import os
import random
import re
import shutil
import signal
import threading
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from sppo_fast import distributed, quant

STEP_DIR = re.compile(r"^step_(\d+)$")
MANIFEST = "manifest.json"
# SHA-256: stdlib, hardware-accelerated on x86 (SHA-NI) and ARMv8, and checkable by hand with `sha256sum`. Measured
# on the 2-core CPU box: 1.8 GB/s from the page cache (blake2b 0.8 GB/s, crc32 3.5 GB/s but no standard tool).
DIGEST = "sha256"


def file_digest(path) -> str:
    """The hex DIGEST of a file, read in chunks (memory stays flat for multi-GB weight files)."""
    digest = hashlib.new(DIGEST)  # (hashlib.file_digest is Python 3.11+; setup.py admits 3.10)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(16 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _flatten_optimizer(state_dict: dict) -> tuple[dict, dict]:
    tensors, meta = {}, {"param_groups": state_dict["param_groups"], "scalars": {}}
    for pid, state in state_dict["state"].items():
        for key, value in state.items():
            name = f"optim.{pid}.{key}"
            if isinstance(value, torch.Tensor):
                tensors[name] = value.detach().cpu().contiguous()
            else:
                meta["scalars"][name] = value
    return tensors, meta


def _unflatten_optimizer(tensors: dict, meta: dict) -> dict:
    state = {}
    for name, value in list(tensors.items()) + list(meta["scalars"].items()):
        if not name.startswith("optim."):
            continue
        _, pid, key = name.split(".", 2)
        state.setdefault(int(pid), {})[key] = value
    return {"state": state, "param_groups": meta["param_groups"]}


def rng_state() -> tuple[dict, dict]:
    tensors = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors["rng.cuda"] = torch.cuda.get_rng_state()
    version, internal, gauss = random.getstate()
    return tensors, {"python_random": [version, list(internal), gauss]}


def set_rng_state(tensors: dict, meta: dict) -> None:
    torch.set_rng_state(tensors["rng.torch"])
    if "rng.cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["rng.cuda"])
    version, internal, gauss = meta["python_random"]
    random.setstate((version, tuple(internal), gauss))


def save(run_dir, step: int, *, policy, tokenizer, value_head, optimizer, scheduler, sampler_state: dict,
         extra: dict, keep_last: int = 3, critic=None, extra_tensors: dict | None = None) -> Path:
    """Write checkpoint `step` atomically and prune older ones beyond `keep_last`. Returns its directory.

    extra_tensors: trainer state beyond the optimizer's (e.g. the value head's replay buffer), back from restore() as
    meta["extra_tensors"]."""
    # only what training changes: a frozen base cannot turn NaN by training, and an NF4 weight (the qlora rung) has
    # no isfinite
    for name, module in (("policy", policy), ("critic", critic), ("value head", value_head)):
        if module is not None and not all(torch.isfinite(p).all() for p in module.parameters() if p.requires_grad):
            raise FloatingPointError(f"refusing to save checkpoint step {step}: the {name} has NaN/inf weights")
    root = Path(run_dir) / "checkpoints"
    final = root / f"step_{step:06d}"
    tmp = root / f"step_{step:06d}.tmp"
    # torchrun + FSDP: every rank gathers full tensors (collectives), rank 0 alone writes the single-process layout
    full = distributed.gather_for_checkpoint(policy=policy, critic=critic, value_head=value_head, optimizer=optimizer)
    if not distributed.is_main():
        distributed.barrier()  # returns once rank 0 has renamed the checkpoint into place
        return final
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    policy.save_pretrained(tmp / "policy", state_dict=full["policy"], safe_serialization=True)
    quant.save_description(policy, tmp / "policy")  # a 4-bit base: how to rebuild it on resume (no-op otherwise)
    tokenizer.save_pretrained(tmp / "policy")
    if critic is not None:  # a separate critic LLM (PPO, or SPPO with --critic)
        critic.save_pretrained(tmp / "critic", state_dict=full["critic"], safe_serialization=True)
        quant.save_description(critic, tmp / "critic")
    if value_head is not None:
        save_file({k: v.detach().cpu().contiguous() for k, v in full["value_head"].items()},
                  tmp / "value_head.safetensors")
    tensors, meta = _flatten_optimizer(full["optimizer"])
    rng_tensors, rng_meta = rng_state()
    tensors.update(rng_tensors, **full["rng"])  # rng.*.rankN: the other ranks' states
    tensors.update({f"extra.{k}": v.detach().cpu().contiguous() for k, v in (extra_tensors or {}).items()})
    meta.update(rng_meta, step=step, scheduler=scheduler.state_dict(), sampler=sampler_state, extra=extra)
    save_file(tensors, tmp / "trainer.safetensors", metadata={"json": json.dumps(meta)})
    written = [p for p in sorted(tmp.rglob("*")) if p.is_file()]
    files = {str(p.relative_to(tmp)): p.stat().st_size for p in written}
    # hashed right after writing, so the bytes come from the page cache, not the disk: ~0.6 s per GB (DIGEST)
    digests = {str(p.relative_to(tmp)): file_digest(p) for p in written}
    (tmp / MANIFEST).write_text(json.dumps({"step": step, "files": files, "digest": DIGEST, "digests": digests},
                                           indent=1))
    if final.exists():  # re-saving the same step (e.g. Ctrl-C right after a periodic save)
        shutil.rmtree(final)
    os.replace(tmp, final)
    for old in list_checkpoints(run_dir)[:-keep_last] if keep_last > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    distributed.barrier()
    return final


def list_checkpoints(run_dir) -> list:
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and STEP_DIR.match(p.name)]
    return sorted(found, key=lambda p: int(STEP_DIR.match(p.name).group(1)))


def resolve(path) -> Path:
    """A checkpoint directory, or a run directory (its latest checkpoint)."""
    path = Path(path)
    if STEP_DIR.match(path.name) and (path / "trainer.safetensors").is_file():
        return path
    found = list_checkpoints(path)
    if not found:
        raise FileNotFoundError(f"no checkpoint in {path} (expected {path}/checkpoints/step_*/ or a step_* "
                                f"directory holding trainer.safetensors)")
    return found[-1]


def verify(ckpt: Path) -> str | None:
    """Why `ckpt` cannot be resumed from, or None when it verifies: every file the manifest lists is there at its
    size and digest, every safetensors file's header parses and covers the file, and every floating tensor in them
    is finite. Reads every byte once (~1 s per GB); a resume loads them all anyway."""
    from safetensors import safe_open

    ckpt = Path(ckpt)
    manifest = ckpt / MANIFEST
    if manifest.is_file():  # checkpoints written before the manifest existed get the safetensors checks alone
        try:
            listed = json.loads(manifest.read_text())
            files, digests, algo = listed["files"], listed.get("digests", {}), listed.get("digest", DIGEST)
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            return f"{MANIFEST} is unreadable ({e})"
        for name, size in files.items():
            if not (ckpt / name).is_file():
                return f"{name} is missing"
            if (ckpt / name).stat().st_size != size:
                return f"{name} has {(ckpt / name).stat().st_size} bytes, the manifest says {size}"
        if digests and algo != DIGEST:
            return f"{MANIFEST} uses the digest {algo!r}; this version checks {DIGEST!r}"
        for name, digest in digests.items():  # manifests written before digests existed have none
            if file_digest(ckpt / name) != digest:
                return f"{name} does not match its {algo} digest in the manifest (its bytes changed after the save)"
    if not (ckpt / "trainer.safetensors").is_file():
        return "trainer.safetensors is missing"
    for path in sorted(ckpt.rglob("*.safetensors")):
        try:
            with safe_open(str(path), framework="pt") as f:
                if path.name == "trainer.safetensors":
                    json.loads(f.metadata()["json"])
                bad = _first_nonfinite(f)
        except Exception as e:  # safetensors raises its own error types (SafetensorError) for a bad file
            return f"{path.relative_to(ckpt)} does not load ({type(e).__name__}: {e})"
        if bad:  # a save refuses NaN/inf weights, so these were damaged later (or written by an older version)
            return f"{path.relative_to(ckpt)} holds NaN/inf values (tensor {bad!r})"
    return None


def _first_nonfinite(f) -> str | None:
    """The name of the first floating tensor of an open safetensors file with a NaN/inf, one tensor in memory at a
    time."""
    for key in f.keys():
        t = f.get_tensor(key)
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            return key
    return None


def newest_valid(path) -> tuple[Path, list]:
    """(the checkpoint to resume from, [(skipped checkpoint, why), ...]) for a run directory: the newest checkpoint
    that verifies. A checkpoint directory named explicitly must verify itself."""
    path = Path(path)
    if STEP_DIR.match(path.name):
        if not path.is_dir():
            raise FileNotFoundError(f"checkpoint {path} does not exist")
        if why := verify(path):
            raise ValueError(f"checkpoint {path} is damaged: {why}; resume from the run directory {path.parent.parent} "
                             f"to fall back to an older checkpoint")
        return path, []
    if not path.is_dir():
        raise FileNotFoundError(f"run directory {path} does not exist")
    found = list_checkpoints(path)
    if not found:
        raise FileNotFoundError(f"no checkpoint in {path} (expected {path}/checkpoints/step_*/)")
    skipped = []
    for ckpt in reversed(found):
        why = verify(ckpt)
        if why is None:
            return ckpt, skipped
        skipped.append((ckpt, why))
    raise ValueError(f"no checkpoint in {path} verifies: " + "; ".join(f"{c.name}: {why}" for c, why in skipped))


def remove_unfinished(run_dir) -> list:
    """Delete checkpoints/step_*.tmp left by a save that was interrupted; returns what was removed."""
    root = Path(run_dir) / "checkpoints"
    stale = sorted(root.glob("step_*.tmp")) if root.is_dir() else []
    for tmp in stale:
        shutil.rmtree(tmp, ignore_errors=True)
    return stale


def load_trainer_state(ckpt: Path) -> tuple[dict, dict]:
    """(tensors, metadata) of trainer.safetensors: the optimizer/RNG tensors and the JSON metadata."""
    from safetensors import safe_open
    with safe_open(str(ckpt / "trainer.safetensors"), framework="pt") as f:
        meta = json.loads(f.metadata()["json"])
    return load_file(str(ckpt / "trainer.safetensors")), meta


def restore(ckpt: Path, *, value_head, optimizer, scheduler) -> dict:
    """Load value head, optimizer, scheduler and RNG states from `ckpt`; returns the metadata (step, sampler, ...).

    The policy weights are loaded by the caller from ckpt/policy (as a model directory)."""
    tensors, meta = load_trainer_state(ckpt)
    # distributed.load_*: plain load_state_dict in one process; into FSDP shards under torchrun (any world size)
    if value_head is not None:
        distributed.load_module(value_head, load_file(str(ckpt / "value_head.safetensors")))
    distributed.load_optimizer(optimizer, _unflatten_optimizer(tensors, meta))
    scheduler.load_state_dict(meta["scheduler"])
    set_rng_state(tensors, meta)
    distributed.restore_rank_rng(tensors)
    meta["extra_tensors"] = {k[len("extra."):]: v for k, v in tensors.items() if k.startswith("extra.")}
    return meta


class Interrupted(KeyboardInterrupt):
    """A SIGINT or SIGTERM that stops the run where it is: `signum` says which, `at_once` whether it was a second
    signal (the user insisted: nothing more is saved). A KeyboardInterrupt, so `except Exception` never swallows it."""

    def __init__(self, signum: int, at_once: bool = False):
        super().__init__(signal_name(signum))
        self.signum, self.at_once = signum, at_once


def signal_name(signum: int) -> str:
    return signal.Signals(signum).name


class Interrupts:
    """SIGINT (Ctrl-C) and SIGTERM (docker stop, SLURM preemption, Kubernetes) end a run in a resumable state.

    While `deferred` (the training loop sets it: a step or a save must not stop half-way; `deferring(on)` scopes it),
    the first signal only sets `signum`, and the loop saves a checkpoint at its next safe point. Everywhere else
    (model load, evaluation: nothing there changes the training state) the first signal raises Interrupted at once.
    A second signal always raises Interrupted(at_once=True): quit now, keep what is on disk. Installed only in the
    main thread (Python delivers signals there); `restore()` puts the previous handlers back."""

    SIGNALS = ("SIGINT", "SIGTERM")

    def __init__(self):
        self.signum, self.deferred, self.previous = None, False, {}
        if threading.current_thread() is threading.main_thread():
            for name in self.SIGNALS:
                sig = getattr(signal, name)
                self.previous[sig] = signal.signal(sig, self._on_signal)

    def _on_signal(self, signum, frame):
        again = self.signum is not None
        self.signum = self.signum or signum
        if again or not self.deferred:
            raise Interrupted(signum, at_once=again)
        name = signal_name(signum)
        # os.write, not print: a print from a handler can land inside another print of the main thread's and raise
        os.write(2, f"\n{name}: finishing this step, then saving a checkpoint ({name} again to quit at once, "
                    f"without saving)\n".encode())

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def deferring(self, on: bool = True):
        """Context manager: inside it, `deferred` is `on` (on: the first signal waits for the next safe point)."""
        @contextlib.contextmanager
        def scope():
            before, self.deferred = self.deferred, on
            try:
                yield
            finally:
                self.deferred = before
        return scope()

    def restore(self) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        self.previous = {}

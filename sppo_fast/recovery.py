"""What an interrupted or failed training run leaves on disk, and the one line that says how to continue it.

sppo_fast/train.py's loop calls these at its safe points: a first SIGINT/SIGTERM waits for the end of the step (or
stops an evaluation at once, which changes no training state), a second quits at once; an exception inside a step
saves the newest state the step cannot have touched, then re-raises. Signal handling itself is
`checkpoint.Interrupts`.
"""
import functools
import signal
import sys

from sppo_fast import checkpoint, distributed


def resumable(train):
    """Decorator for the training entry point `train(args, interrupts, where) -> dict`, called as `train(args)`: the
    SIGINT/SIGTERM handlers go in before anything slow, so a signal during the model load or the start evaluation
    also ends in a resumable state and one line, not a traceback (`checkpoint.Interrupts` says where a signal waits
    and where not). `where` is what the run has reached: its run_dir, its step."""
    @functools.wraps(train)
    def run(args):
        interrupts, where = checkpoint.Interrupts(), {}
        try:
            return train(args, interrupts, where)
        except checkpoint.Interrupted as e:  # stopped where it was: outside a step, or a second signal
            return stopped(e, where.get("run_dir"), where.get("step"))
        finally:
            interrupts.restore()
    return run


def interruptible(interrupts, evaluation):
    """evaluation() (it changes no training state: its RNG is forked), or None when a first signal stopped it at
    once. Under torchrun it runs to its end (its collectives need every rank) and the loop stops after it."""
    try:
        with interrupts.deferring(distributed.enabled()):
            return evaluation()
    except checkpoint.Interrupted as e:
        if e.at_once:
            raise
        return None


def _resume_hint(run_dir) -> str:
    found = checkpoint.list_checkpoints(run_dir)
    how = f"continues from {found[-1].name}" if found else "starts it again from step 0 (no step was saved)"
    return f"`sppo-fast train --resume {run_dir}` {how}"


def _say(line: str) -> None:
    if distributed.is_main():  # torchrun: one line, not one per rank
        print(f"sppo-fast train: {line}", file=sys.stderr, flush=True)


def saved_on_signal(interrupts, ckpt, run_dir, step, bar) -> dict:
    signum = interrupts.signum or signal.SIGINT  # torchrun: another rank's signal (torchrun forwards SIGINT)
    bar.close()
    _say(f"interrupted: saved {ckpt} ({checkpoint.signal_name(signum)} during step {step}); "
         f"`sppo-fast train --resume {run_dir}` continues it")
    return {"interrupted": True, "signal": int(signum), "step": step, "run_dir": str(run_dir)}


def stopped(e, run_dir, step) -> dict:
    """A signal that stopped the run where it was: before the first step (model load, start evaluation: nothing to
    save, the run directory holds its config) or a second signal (quit at once: the checkpoints on disk stay)."""
    name = checkpoint.signal_name(e.signum)
    if run_dir is None or not (run_dir / "config.yaml").is_file():
        _say(f"{name}: stopped before the run started; nothing was written")
    else:
        how = "quit at once, without saving" if e.at_once else "stopped before a step completed, nothing to save"
        _say(f"{name}: {how}{f' (during step {step})' if step else ''}; {_resume_hint(run_dir)}")
    return {"interrupted": True, "signal": int(e.signum), "step": step, "run_dir": run_dir and str(run_dir)}


def save_after_error(error, step, step_start, progress, stepper, save, run_dir) -> None:
    """After an exception in step `step`, save the newest state it cannot have touched and say so on stderr; the
    caller re-raises (a reward that raises, an OOM, a full disk: a bug to read in its traceback, not a typo).

    The weights and optimizer are whole at two points of a step: before its first optimizer.step (`stepper.stepped`
    still False; the data position and RNG go back to `step_start`, so the saved step - 1 resumes as if this step had
    never begun) and once its update returned (`progress["completed"] == step`: step itself is saved). In between
    an optimizer step may have updated some parameters and not others: nothing is saved. Never saved either: a
    NaN/inf (FloatingPointError: nothing good to keep), and anything under torchrun (a save needs every rank)."""
    what = f"step {step} raised {type(error).__name__}"
    if isinstance(error, FloatingPointError):
        return
    if distributed.enabled():
        return _say(f"{what}; not saved (under torchrun a save needs every rank); {_resume_hint(run_dir)}")
    if progress["completed"] == step:
        target, sampler_state = step, None
    elif not stepper.stepped:
        target, sampler_state = step - 1, step_start[0]
    else:
        return _say(f"{what} inside its optimizer update, which may have changed some weights and not others: not "
                    f"saved; {_resume_hint(run_dir)}")
    if target in (0, progress["saved"]):  # no step completed yet, or the last one is on disk already
        return _say(f"{what}; {_resume_hint(run_dir)}")
    if sampler_state is not None:
        checkpoint.set_rng_state(*step_start[1])  # the RNG as step `target` left it
    try:
        ckpt = save(target, sampler_state)
    except Exception as e:  # e.g. the disk that is full: report it, and let the original error be the one raised
        return _say(f"{what}; saving step {target} failed too ({type(e).__name__}: {e}); {_resume_hint(run_dir)}")
    _say(f"{what}; saved the last completed step, {ckpt}; `sppo-fast train --resume {run_dir}` continues from it")

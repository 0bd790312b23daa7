"""Killed runs lose nothing, and two runs on one --out are refused (issue 20, items 3 and 4).

``pagkit eval``, ``pagkit restore --test-images``, ``pagkit tune`` and ``pagkit train`` are started in subprocesses (forked
from a forkserver that has imported pagkit once, so that each start costs no imports: ``pagkit.cli.main`` runs in
the child; not forked from the test itself, whose OpenMP threads a forked child can deadlock on) and killed with SIGKILL
at 5 points each (chosen by a seeded RNG: after the k-th finished file appears in the output
folder, plus a random few milliseconds, so some kills land in the middle of a write), then run to the end.
Their final results equal an uninterrupted run's exactly (train: the same weights), and no half-written file
(``.*.tmp``) is left or read.
"""
import json
import multiprocessing
import os
import random
import signal
import time
from pathlib import Path

import pytest
import torch

from pagkit import io

def _eval_args(assets):
    return ["eval", "--model", str(assets / "model"), "--methods", "none,pag", "--scales", "2", "--layers", "down.1",
            "--steps", "2", "--num-samples", "16", "--shard-size", "2", "--classifier", str(assets / "classifier"),
            "--classifier-b", str(assets / "classifier-b"), "--num-real", "100", "--threads", "1", "--quiet"]


def _restore_args(assets):
    return ["restore", "--task", "box-inpaint", "--test-images", "8", "--batch-size", "2", "--model",
            str(assets / "model"), "--steps", "2", "--pag-layers", "down.1", "--classifier", str(assets / "classifier"),
            "--num-real", "100", "--threads", "1", "--quiet"]


def _tune_args(assets):  # 6 settings, budget 100 in shards of 4: 25 shards over two rungs and the confirmation
    return ["tune", "--model", str(assets / "model"), "--method", "pag", "--budget", "100", "--layers",
            "down.1;down.2;mid", "--scales", "1,2", "--intervals", "0:1", "--shard-size", "4", "--steps", "2",
            "--classifier", str(assets / "classifier"), "--classifier-b", str(assets / "classifier-b"),
            "--num-real", "200", "--threads", "1", "--quiet"]


# A fork of the test process can hang for good: the test has run torch's OpenMP pool, which is not fork-safe (a
# child of it waited on a futex forever in CI). The forkserver is a fresh, single-threaded interpreter that imports
# pagkit once; each child is a fork of it.
_CTX = multiprocessing.get_context("forkserver")
_CTX.set_forkserver_preload(["torch", "pagkit.cli"])

TRAIN_ARGS = ["train", "--size", "tiny", "--max-steps", "12", "--batch-size", "4", "--checkpoint-every", "1",
              "--threads", "1"]


def _finished(out: Path) -> int:
    # os.walk, not rglob: the child renames half-written folders (``.ema-25pct.tmp`` -> ``ema-25pct``) while we
    # count, and os.walk skips a folder that vanished under it where rglob raises.
    count = 0
    for _, dirs, files in os.walk(out):
        dirs[:] = [d for d in dirs if not d.endswith(".tmp")]  # a half-written snapshot is not finished
        count += sum(1 for name in files if not name.endswith(".tmp") and name != io.LOCK_NAME)
    return count


def _cli_child(argv):
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    os.dup2(devnull, 2)
    from pagkit.cli import main
    os._exit(main(argv))


def _start(argv) -> multiprocessing.Process:
    proc = _CTX.Process(target=_cli_child, args=(argv,))
    proc.start()
    return proc


def _run_with_kills(argv, out: Path, kills: int, seed: int) -> list[int]:
    """Run ``pagkit argv --out out``, SIGKILL it ``kills`` times (after a new finished file, + 0-30 ms), then
    let it finish. Returns the number of finished files at each kill."""
    rng = random.Random(seed)
    at = []
    argv = [*argv, "--out", str(out)]
    for _ in range(kills):
        before = _finished(out) if out.exists() else 0
        target = before + rng.randint(1, 2)
        proc = _start(argv)
        while proc.is_alive() and (not out.exists() or _finished(out) < target):
            time.sleep(0.002)
        time.sleep(rng.uniform(0, 0.03))
        if not proc.is_alive():  # finished before the kill point: no more kills to make
            assert proc.exitcode == 0
            break
        os.kill(proc.pid, signal.SIGKILL)
        proc.join()
        assert proc.exitcode == -signal.SIGKILL
        at.append(_finished(out))
    proc = _start(argv)
    proc.join()
    assert proc.exitcode == 0
    return at


def _temporaries(out: Path) -> list[Path]:
    """Half-written files: ours (``.*.tmp``) and safetensors' own (``.tmpXXXXXX``)."""
    return [p for p in out.rglob(".*") if p.name.endswith(".tmp") or io.SAFETENSORS_TMP.fullmatch(p.name)]


def _eval_metrics(out):
    rows = json.loads((out / "results.json").read_text())
    return {r["key"]: {k: v for k, v in r["metrics"].items() if k != "seconds_per_image"} for r in rows}


def _restore_metrics(out):
    return {(r["task"], r["method"]): {k: v for k, v in r["metrics"].items() if k != "seconds_per_image"}
            for r in json.loads((out / "metrics.json").read_text())}


def _same_files(a: Path, b: Path, pattern: str) -> None:
    names = sorted(p.relative_to(a) for p in a.rglob(pattern))
    assert names and names == sorted(p.relative_to(b) for p in b.rglob(pattern))
    for name in names:
        x, y = io.load_tensors(a / name), io.load_tensors(b / name)
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x), name


def test_killed_eval_resumes_to_the_uninterrupted_result(assets, tmp_path):
    from pagkit.cli import main
    assert main([*_eval_args(assets), "--out", str(tmp_path / "straight")]) == 0
    at = _run_with_kills(_eval_args(assets), tmp_path / "killed", kills=5, seed=1)
    assert len(at) == 5, at
    assert _eval_metrics(tmp_path / "killed") == _eval_metrics(tmp_path / "straight")
    _same_files(tmp_path / "straight" / "shards", tmp_path / "killed" / "shards", "*.safetensors")
    assert _temporaries(tmp_path / "killed") == []


def test_killed_restore_resumes_to_the_uninterrupted_result(assets, tmp_path):
    from pagkit.cli import main
    assert main([*_restore_args(assets), "--out", str(tmp_path / "straight")]) == 0
    at = _run_with_kills(_restore_args(assets), tmp_path / "killed", kills=5, seed=2)
    assert len(at) == 5, at
    assert _restore_metrics(tmp_path / "killed") == _restore_metrics(tmp_path / "straight")
    _same_files(tmp_path / "straight" / "shards", tmp_path / "killed" / "shards", "*.safetensors")
    assert _temporaries(tmp_path / "killed") == []


def test_killed_tune_resumes_to_the_same_preset(assets, tmp_path):
    from pagkit.cli import main
    assert main([*_tune_args(assets), "--out", str(tmp_path / "straight")]) == 0
    at = _run_with_kills(_tune_args(assets), tmp_path / "killed", kills=5, seed=4)
    assert len(at) == 5, at
    assert io.read_json(tmp_path / "killed" / "preset.json") == io.read_json(tmp_path / "straight" / "preset.json")
    for rung in ("rung0", "rung1", "confirm"):
        _same_files(tmp_path / "straight" / rung / "shards", tmp_path / "killed" / rung / "shards", "*.safetensors")
    assert _temporaries(tmp_path / "killed") == []


def test_killed_training_resumes_to_the_same_weights(tmp_path):
    from pagkit.cli import main
    assert main([*TRAIN_ARGS, "--out", str(tmp_path / "straight")]) == 0
    at = _run_with_kills(TRAIN_ARGS, tmp_path / "killed", kills=5, seed=3)
    assert len(at) == 5, at
    for folder in ("final", "ema-25pct", "ema-50pct", "ema-100pct"):
        _same_files(tmp_path / "straight" / folder, tmp_path / "killed" / folder, "*.safetensors")
    state = io.read_json(tmp_path / "killed" / "checkpoint" / "state.json")
    assert state["step"] == 12 and sorted(p.name for p in (tmp_path / "killed" / "checkpoint").iterdir()) == \
        sorted(["state.json", *state["files"].values()])  # older checkpoints (and half-made ones) are gone
    assert io.read_json(tmp_path / "killed" / "summary.json")["finished"]
    assert _temporaries(tmp_path / "killed") == []


def test_taking_the_lock_clears_our_and_safetensors_half_written_files_and_nothing_else(tmp_path):
    """safetensors >= 0.7 writes through its own ``.tmpXXXXXX`` beside the target: a kill mid-write leaves
    one inside a checkpoint or shard folder, where the next run must clear it (CI found one left)."""
    (tmp_path / "checkpoint").mkdir()
    stale = [tmp_path / "checkpoint" / ".tmp6sV78G", tmp_path / ".results.json.k2j3.tmp"]
    kept = [tmp_path / "checkpoint" / "state.json", tmp_path / ".tmpnotes.txt", tmp_path / "tmpAbCdEf"]
    for p in stale + kept:
        p.write_text("x")
    with io.run_lock(tmp_path):
        pass
    assert [p for p in stale if p.exists()] == [] and all(p.exists() for p in kept)


def test_a_kill_mid_checkpoint_leaves_the_last_checkpoint_whole(tmp_path, monkeypatch):
    """A kill after the new tensors but before state.json: the resumed run reads the previous checkpoint's
    tensors (named by its step), not the newer ones, and ends where the uninterrupted run does."""
    from pagkit.train import TrainConfig, train
    common = dict(size="tiny", batch_size=4, max_steps=4, warmup_steps=2, checkpoint_every=1, milestones=(1.0,))
    straight = train(TrainConfig(out=str(tmp_path / "straight"), **common))
    writes = []
    plain = io.write_json

    def killed_at_step_3(path, obj):
        if Path(path).name == "state.json" and obj["step"] == 3:
            raise KeyboardInterrupt  # as a kill: the tensors of step 3 are on disk, state.json still says 2
        writes.append(path)
        plain(path, obj)
    monkeypatch.setattr(io, "write_json", killed_at_step_3)
    with pytest.raises(KeyboardInterrupt):
        train(TrainConfig(out=str(tmp_path / "resumed"), **common))
    monkeypatch.setattr(io, "write_json", plain)
    assert io.read_json(tmp_path / "resumed" / "checkpoint" / "state.json")["step"] == 2
    resumed = train(TrainConfig(out=str(tmp_path / "resumed"), **common))
    _same_files(straight, resumed, "*.safetensors")


# ---------------------------------------------------------------------------------------------- one run per --out


def _locker(folder, ready):
    with io.run_lock(folder):
        ready.set()
        time.sleep(600)


def _hold_lock(folder: Path):
    """A subprocess that holds ``folder``'s run lock until killed."""
    ctx = _CTX
    ready = ctx.Event()
    proc = ctx.Process(target=_locker, args=(folder, ready))
    proc.start()
    assert ready.wait(60)
    return proc


def test_a_second_run_on_the_same_out_is_refused_and_a_dead_owners_lock_is_taken_over(assets, tmp_path,
                                                                                     capsys):
    from pagkit.cli import main
    out = tmp_path / "out"
    import numpy as np
    from PIL import Image
    Image.fromarray(np.full((32, 32), 128, dtype=np.uint8)).save(tmp_path / "in.png")
    restore_input = ["restore", "--task", "sr2", "--model", str(assets / "model"), "--input", str(tmp_path / "in.png"),
                     "--steps", "1", "--pag-layers", "down.1", "--threads", "1", "--quiet"]
    owner = _hold_lock(out)
    try:
        for argv in (_eval_args(assets), _restore_args(assets), restore_input, _tune_args(assets), TRAIN_ARGS):
            assert main([*argv, "--out", str(out)]) == 2
            err = capsys.readouterr().err.strip()
            assert err == (f"pagkit {argv[0]}: error: {out} is in use by another pagkit run (pid {owner.pid}); "
                           "wait for it to finish or choose another --out"), err
        assert [p.name for p in out.iterdir()] == [io.LOCK_NAME]  # nothing was written
    finally:
        owner.kill()
        owner.join()
    assert (out / io.LOCK_NAME).read_text().strip() == str(owner.pid)  # a stale lock: its owner is dead
    (out / ".shard.abc123.tmp").write_bytes(b"half")  # and what the dead run left half-written
    with io.run_lock(out):
        assert (out / io.LOCK_NAME).read_text().strip() == str(os.getpid())
        assert not (out / ".shard.abc123.tmp").exists()
        with io.run_lock(out):  # re-entrant in one process
            pass
    from pagkit.evaluate import Sweep, expand
    configs = expand(str(assets / "model"), ["none"], steps=1, num_samples=8)
    sweep = Sweep(out, configs, shard_size=8, classifier=str(assets / "classifier"),
                  classifier_b=str(assets / "classifier-b"), num_real=50, progress=False)
    owner = _hold_lock(out)
    try:
        with pytest.raises(io.RunLocked, match="is in use by another pagkit run"):
            sweep.run()
    finally:
        owner.kill()
        owner.join()
    assert len(sweep.run()) == 1  # the owner gone, the sweep runs


def _cli_child_err(argv, errors):
    import contextlib
    import io as text_io
    err = text_io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(text_io.StringIO()):
        from pagkit.cli import main
        code = main(argv)
    errors.put((code, err.getvalue()))


def test_two_runs_at_once_one_is_refused(assets, tmp_path):
    """Two ``pagkit eval`` processes started together on one --out: one runs, the other is refused."""
    ctx = _CTX
    errors = ctx.Queue()
    argv = [*_eval_args(assets), "--num-samples", "8", "--shard-size", "8", "--out", str(tmp_path / "out")]
    procs = [ctx.Process(target=_cli_child_err, args=(argv, errors)) for _ in range(2)]
    for p in procs:
        p.start()
    results = sorted(errors.get(timeout=300) for _ in procs)
    for p in procs:
        p.join()
    assert [code for code, _ in results] == [0, 2], results
    assert "is in use by another pagkit run" in results[1][1] and len(results[1][1].strip().splitlines()) == 1

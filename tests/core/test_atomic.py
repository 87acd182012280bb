"""Crash safety of save_pretrained: killed at any file-system operation, the save directory is either exactly as it
was or exactly the new content, and the next save cleans up what the crash left."""

import builtins
import contextlib
import errno
import os
import shutil

import pytest
import torch

from adapterflow import LoraConfig, atomic, write_adapters

CONFIG = LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"])
CRASH = 77


def adapters(value: float):
    state = {
        "base_model.model.q_proj.lora_A.weight": torch.full((2, 8), value),
        "base_model.model.q_proj.lora_B.weight": torch.full((8, 2), value),
    }
    return {"default": (state, CONFIG), "other": (state, CONFIG)}


def snapshot(folder):
    if not folder.exists():
        return None
    return {str(p.relative_to(folder)): p.read_bytes() if p.is_file() else "dir" for p in sorted(folder.rglob("*"))}


def patched_file_system(crash_at: int):
    """Wrap every file-system mutation; the crash_at-th one kills the process on the spot (no cleanup runs)."""
    calls = {"n": 0}

    def step(fn):
        def wrapper(*args, **kwargs):
            calls["n"] += 1
            if calls["n"] == crash_at:
                os._exit(CRASH)
            return fn(*args, **kwargs)
        return wrapper

    for name in ("open", "writev", "write", "fsync", "rename", "replace", "link", "mkdir", "chmod", "fchmod",
                 "unlink", "rmdir", "symlink"):
        setattr(os, name, step(getattr(os, name)))
    atomic._exchange = step(atomic._exchange)
    real_open = builtins.open
    builtins.open = lambda file, mode="r", *a, **k: (step(real_open) if any(c in mode for c in "wax+") else real_open)(file, mode, *a, **k)


def save_in_child(target, crash_at, safe=True, fallback=False):
    """Run the save in a forked child that dies at the crash_at-th operation; True if it got that far."""
    pid = os.fork()
    if pid == 0:
        try:
            if fallback:
                atomic._exchange = _no_exchange
            patched_file_system(crash_at)
            write_adapters(target, adapters(2.0), safe_serialization=safe)
        except BaseException:
            os._exit(1)
        os._exit(0)
    _, status = os.waitpid(pid, 0)
    code = os.waitstatus_to_exitcode(status)
    assert code in (0, CRASH), f"the save failed with exit code {code}"
    return code == CRASH


def _no_exchange(a, b):
    # A file system without RENAME_EXCHANGE (the libc call fails with EINVAL): the two-rename fallback runs.
    raise OSError(errno.EINVAL, "Invalid argument")


@pytest.mark.parametrize("fallback", [False, True], ids=["exchange", "two-renames"])
def test_crash_at_any_point_leaves_old_or_new_content(tmp_path, fallback):
    old_dir, reference = tmp_path / "old", tmp_path / "reference"
    write_adapters(old_dir, adapters(1.0), safe_serialization=False)
    (old_dir / "notes.txt").write_text("user file")
    old = snapshot(old_dir)
    shutil.copytree(old_dir, reference)
    write_adapters(reference, adapters(2.0))
    new = snapshot(reference)
    assert old != new and "notes.txt" in new and "adapter_model.bin" not in new
    assert old["adapterflow.json"] != new["adapterflow.json"]  # a crash never pairs a manifest with other files
    crash_at, outcomes = 1, set()
    while True:
        target = tmp_path / f"run{crash_at}" / "adapter"
        shutil.copytree(old_dir, target)
        crashed = save_in_child(target, crash_at, fallback=fallback)
        state = snapshot(target)
        if state is None:  # only possible between the fallback's two renames: the next save restores it
            assert fallback
        else:
            assert state in (old, new), f"mixed content after a crash at operation {crash_at}"
        outcomes.add("old" if state == old else "new" if state == new else "missing")
        write_adapters(target, adapters(2.0))  # the next save recovers and cleans up
        assert snapshot(target) == new
        assert sorted(p.name for p in target.parent.iterdir()) == ["adapter"], "leftovers of the crashed save"
        if not crashed:
            break
        crash_at += 1
    assert crash_at > 10 and {"old", "new"} <= outcomes


def test_save_into_the_working_directory(tmp_path, monkeypatch):
    target = tmp_path / "adapter"
    write_adapters(target, adapters(1.0))
    (target / "sub").mkdir()
    monkeypatch.chdir(target / "sub")
    write_adapters("..", adapters(2.0))
    assert os.getcwd() == str(target / "sub") and (target / "sub").is_dir()  # cwd follows the new tree
    assert os.path.exists("../adapter_model.safetensors")


# Failures (an OSError, not a crash) at each file-system operation: the save raises, and every folder it touches
# or reads is byte-identical to before, with no leftovers; for a conversion the initial adapter is never written.

FAILABLE = ("open", "writev", "write", "fsync", "rename", "replace", "link", "mkdir", "chmod", "fchmod", "symlink")


@contextlib.contextmanager
def failing_file_system(fail_at: int):
    """The fail_at-th file-system mutation raises EIO; yields the call counter."""
    calls = {"n": 0}
    saved = {name: getattr(os, name) for name in FAILABLE}
    saved_exchange, real_open = atomic._exchange, builtins.open

    def step(fn):
        def wrapper(*args, **kwargs):
            calls["n"] += 1
            if calls["n"] == fail_at:
                raise OSError(errno.EIO, "Input/output error (injected)")
            return fn(*args, **kwargs)
        return wrapper

    try:
        for name, fn in saved.items():
            setattr(os, name, step(fn))
        atomic._exchange = step(saved_exchange)
        builtins.open = lambda file, mode="r", *a, **k: (
            step(real_open) if any(c in mode for c in "wax+") else real_open)(file, mode, *a, **k)
        yield calls
    finally:
        for name, fn in saved.items():
            setattr(os, name, fn)
        atomic._exchange, builtins.open = saved_exchange, real_open


def restore(folder, content):
    if content is None:
        return
    folder.mkdir(parents=True)
    for rel, data in content.items():
        path = folder / rel
        if data == "dir":
            path.mkdir(exist_ok=True)
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)


def run_with_failures(save, watched, parent, expected_new, fallback, monkeypatch):
    """Call save() failing at operation 1, 2, ... until no operation is left to fail. A failure the save reports
    must have changed nothing; one it tolerates (e.g. mkdir of a folder that exists) must not spoil the result."""
    if fallback:
        monkeypatch.setattr(atomic, "_exchange", _no_exchange)
    before = {folder: snapshot(folder) for folder in watched}
    entries = sorted(p.name for p in parent.iterdir())
    fail_at = 1
    while True:
        with failing_file_system(fail_at) as calls:
            try:
                save()
                failed = None
            except OSError as exc:
                failed = exc
        if failed is None:
            assert expected_new(), f"a tolerated failure at op {fail_at} spoiled the saved content"
            if calls["n"] < fail_at:
                break
            for folder, content in before.items():  # back to the old state for the next round
                shutil.rmtree(folder, ignore_errors=True)
                restore(folder, content)
            fail_at += 1
            continue
        assert ".staging-" not in str(failed) and ".replaced-" not in str(failed)
        assert {folder: snapshot(folder) for folder in watched} == before, f"changed after a failure at op {fail_at}"
        assert sorted(p.name for p in parent.iterdir()) == entries, f"leftovers after a failure at op {fail_at}"
        fail_at += 1
    assert fail_at > 10
    assert expected_new(), "the save that finally succeeded wrote the wrong content"


@pytest.mark.parametrize("fallback", [False, True], ids=["exchange", "two-renames"])
@pytest.mark.parametrize("existing", [False, True], ids=["new-folder", "over-old-folder"])
def test_failure_at_any_point_of_a_plain_save_changes_nothing(tmp_path, monkeypatch, fallback, existing):
    target = tmp_path / "out" / "adapter"
    target.parent.mkdir()
    reference = tmp_path / "reference"
    if existing:
        write_adapters(target, adapters(1.0))
        shutil.copytree(target, reference)
    write_adapters(reference, adapters(2.0))
    # The manifests are part of the atomic content: a failed save leaves none (new folder) or the old ones.
    assert {"adapterflow.json", "other/adapterflow.json"} <= set(snapshot(reference))
    run_with_failures(lambda: write_adapters(target, adapters(2.0)), [target], target.parent,
                      lambda: snapshot(target) == snapshot(reference), fallback, monkeypatch)


@pytest.mark.parametrize("fallback", [False, True], ids=["exchange", "two-renames"])
@pytest.mark.parametrize("existing", [False, True], ids=["new-folder", "over-old-folder"])
def test_failure_at_any_point_of_a_conversion_save_changes_neither_folder(tmp_path, monkeypatch, load_base, fallback,
                                                                          existing):
    from adapterflow import get_adapter_model
    from tiny import randomize_adapters

    model = get_adapter_model(load_base(), LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"],
                                                      init_lora_weights="pissa"))
    model.save_pretrained(tmp_path / "initial")
    randomize_adapters(model)
    target = tmp_path / "out" / "converted"
    target.parent.mkdir()
    if existing:
        model.save_pretrained(target)  # an older, unconverted save in the way
        shutil.copytree(target, tmp_path / "reference")
    model.save_pretrained(tmp_path / "reference", path_initial_model_for_weight_conversion=tmp_path / "initial")
    save = lambda: model.save_pretrained(target, path_initial_model_for_weight_conversion=tmp_path / "initial")
    run_with_failures(save, [target, tmp_path / "initial"], target.parent,
                      lambda: snapshot(target) == snapshot(tmp_path / "reference"), fallback, monkeypatch)

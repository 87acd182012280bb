"""Put this folder on PYTHONPATH and set ADAPTERFLOW_AUDIT_DIR and ADAPTERFLOW_AUDIT_ROOT: every torchrun rank
(a process with RANK set) then logs, through a Python audit hook (PEP 578), each file-system write it makes
under ADAPTERFLOW_AUDIT_ROOT (open for writing, mkdir, rename, replace, remove, rmdir, rmtree) to
ADAPTERFLOW_AUDIT_DIR/rank-<RANK>.log. Python's own `open`/`os.open` (safetensors writes through them, torch.save
opens its file with `open`) raise these events, so the log is what the rank wrote, not what it claims."""

import os
import sys

_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
_PATH_EVENTS = {"os.mkdir", "os.rename", "os.replace", "os.remove", "os.rmdir", "shutil.rmtree", "os.truncate",
                "os.link", "os.symlink"}

if "RANK" in os.environ and os.environ.get("ADAPTERFLOW_AUDIT_DIR"):
    _root = os.environ["ADAPTERFLOW_AUDIT_ROOT"]
    _log = open(os.path.join(os.environ["ADAPTERFLOW_AUDIT_DIR"], f"rank-{os.environ['RANK']}.log"), "a",
                buffering=1)

    def _audit(event, args):
        if event == "open":
            paths = [args[0]] if isinstance(args[2], int) and args[2] & _WRITE_FLAGS else []
        elif event in _PATH_EVENTS:
            paths = [a for a in args[:2] if isinstance(a, (str, bytes, os.PathLike))]
        else:
            return
        for path in paths:
            if isinstance(path, (str, os.PathLike)) and os.path.abspath(os.fspath(path)).startswith(_root):
                _log.write(f"{event} {os.path.abspath(os.fspath(path))}\n")

    sys.addaudithook(_audit)

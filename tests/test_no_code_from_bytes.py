"""No code runs from bytes: nothing in server/, scheduler/ or model/ unpickles, unmarshals or
evaluates (pickle, marshal, eval/exec, torch.load, torch.distributed's *_object collectives,
np.load(allow_pickle=True), yaml.load)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("server", "scheduler", "model")

BANNED_MODULES = {"pickle", "_pickle", "cPickle", "marshal", "shelve", "dill", "cloudpickle",
                  "joblib"}  # fmt: skip
BANNED_BUILTINS = {"eval", "exec", "compile", "__import__"}
# torch.distributed's object collectives pickle their payloads; torch.load unpickles
BANNED_ATTRIBUTES = {
    "broadcast_object_list", "all_gather_object", "gather_object", "scatter_object_list",
    "send_object_list", "recv_object_list", "_object_to_tensor", "_tensor_to_object",
    "Unpickler", "loads",
}  # fmt: skip
SAFE_LOADS = {"json", "tomllib", "orjson", "pydantic_core"}  # `x.loads(...)` that are fine
UNSAFE_LOAD = {"torch", "yaml", "np", "numpy"}  # `x.load(...)` that unpickle (np: allow_pickle)


def unsafe_calls(source: str, name: str) -> list[str]:
    """Each banned import or call in one file, as `file:line what`."""
    found = []
    for node in ast.walk(ast.parse(source)):
        where = f"{name}:{getattr(node, 'lineno', 0)}"
        if isinstance(node, ast.Import):
            found += [f"{where} import {a.name}" for a in node.names
                      if a.name.split(".")[0] in BANNED_MODULES]  # fmt: skip
        elif isinstance(node, ast.ImportFrom) and node.module:
            if node.module.split(".")[0] in BANNED_MODULES:
                found.append(f"{where} from {node.module} import")
            found += [f"{where} from {node.module} import {a.name}" for a in node.names
                      if a.name in BANNED_ATTRIBUTES - {"loads"}]  # fmt: skip
        elif isinstance(node, ast.Call):
            fn = node.func
            if isinstance(fn, ast.Name) and fn.id in BANNED_BUILTINS:
                found.append(f"{where} {fn.id}()")
            elif isinstance(fn, ast.Attribute):
                owner = ast.unparse(fn.value)
                root = owner.split(".")[0]
                if fn.attr == "loads" and root in SAFE_LOADS:
                    continue
                if fn.attr == "load" and (root not in UNSAFE_LOAD or (
                        root in ("np", "numpy") and not _allows_pickle(node))):  # fmt: skip
                    continue
                if fn.attr in BANNED_ATTRIBUTES | {"load"}:
                    found.append(f"{where} {owner}.{fn.attr}()")
    return found


def _allows_pickle(call: ast.Call) -> bool:
    return any(k.arg == "allow_pickle" and not (isinstance(k.value, ast.Constant)
               and k.value.value is False) for k in call.keywords)  # fmt: skip


@pytest.mark.timeout(30)
def test_walker_catches_each_kind() -> None:
    """The check itself can fail: every banned form is found, the safe ones are not."""
    bad = """
import pickle
from marshal import loads as m
import torch.distributed as dist
dist.broadcast_object_list(objs)
torch.load(path)
pickle.loads(b)
eval(text)
exec(code)
np.load(f, allow_pickle=True)
yaml.load(f)
"""
    assert [f.split(" ", 1)[1] for f in unsafe_calls(bad, "x.py")] == [
        "import pickle", "from marshal import", "dist.broadcast_object_list()",
        "torch.load()", "pickle.loads()", "eval()", "exec()", "np.load()", "yaml.load()",
    ]  # fmt: skip
    safe = "json.loads(s)\njson.load(f)\nnp.load(f)\nmodel.eval()\nre.compile(p)\ngemv.load()\n"
    assert unsafe_calls(safe, "x.py") == []


@pytest.mark.timeout(30)
def test_no_unpickling_or_eval_anywhere() -> None:
    files = [p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))]
    assert len(files) > 30
    found = [f for p in files for f in unsafe_calls(p.read_text(), str(p.relative_to(ROOT)))]
    assert found == []

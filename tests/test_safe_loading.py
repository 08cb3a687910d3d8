"""Safe loading: no untrusted pickle is unpickled, no code from a checkpoint or config is run, and
no string reaches eval/exec anywhere in the package.

The malicious checkpoints carry a payload that creates a marker directory when it runs; each test
first shows the payload is live (loading it the unsafe way does run it), then that qs.load_model
does not run it.
"""

from __future__ import annotations

import ast
import json
import os
import time
from pathlib import Path

import pytest
import torch

import qk_subspace as qs
from tests.conftest import load_kwargs
from tests.test_integrity import single_thread  # noqa: F401 - autouse fixture


class Payload:
    """Unpickling this calls os.mkdir(marker) -- a stand-in for arbitrary code execution."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def _save_tiny_gpt2(path: Path) -> dict[str, torch.Tensor]:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    hf = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, n_positions=32, vocab_size=40)).eval()
    hf.save_pretrained(path)
    conf = json.loads((path / "config.json").read_text())
    conf["architectures"] = ["GPT2LMHeadModel"]
    conf["n_ctx"] = 32
    (path / "config.json").write_text(json.dumps(conf))
    return hf.state_dict()


def _malicious_bin(path: Path, state: dict[str, torch.Tensor], marker: Path) -> Path:
    """A pytorch_model.bin holding the real weights plus the payload."""
    f = path / "pytorch_model.bin"
    torch.save({**state, "payload": Payload(marker)}, f)
    return f


def _payload_is_live(f: Path, marker: Path) -> None:
    torch.load(f, weights_only=False)  # the unsafe way, on purpose: proves the file is malicious
    assert marker.is_dir()
    marker.rmdir()


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def test_malicious_pytorch_model_bin_is_not_executed(tmp_path: Path) -> None:
    ckpt, marker = tmp_path / "ckpt", tmp_path / "PWNED"
    state = _save_tiny_gpt2(ckpt)
    for f in ckpt.glob("*.safetensors"):
        f.unlink()  # only the pickle is left, so it is the one that gets read
    binf = _malicious_bin(ckpt, state, marker)
    _payload_is_live(binf, marker)
    with pytest.raises(Exception) as info:
        qs.load_model(ckpt)
    assert not marker.exists(), "loading ran code from the checkpoint"
    chain, e = [], info.value
    while e is not None:
        chain.append(f"{type(e).__name__}: {e}")
        e = e.__cause__ or e.__context__
    assert any("weights_only" in m or "Unsupported global" in m for m in chain), chain


def test_safetensors_preferred_over_a_malicious_bin(tmp_path: Path) -> None:
    ckpt, marker = tmp_path / "ckpt", tmp_path / "PWNED"
    state = _save_tiny_gpt2(ckpt)
    _payload_is_live(_malicious_bin(ckpt, state, marker), marker)
    model = qs.load_model(
        ckpt, fold_ln=False, center_writing_weights=False, center_unembed=False, **load_kwargs()
    )
    assert not marker.exists()
    torch.testing.assert_close(model.W_E.detach(), state["transformer.wte.weight"])


def test_clean_pytorch_model_bin_loads_with_weights_only(tmp_path: Path) -> None:
    """A plain tensor state dict in pytorch_model.bin is fine under weights_only=True."""
    ckpt = tmp_path / "ckpt"
    state = _save_tiny_gpt2(ckpt)
    for f in ckpt.glob("*.safetensors"):
        f.unlink()
    torch.save(state, ckpt / "pytorch_model.bin")
    model = qs.load_model(
        ckpt, fold_ln=False, center_writing_weights=False, center_unembed=False, **load_kwargs()
    )
    torch.testing.assert_close(model.W_E.detach(), state["transformer.wte.weight"])


def test_custom_code_in_checkpoint_dir_is_not_run(tmp_path: Path) -> None:
    ckpt, marker = tmp_path / "ckpt", tmp_path / "PWNED"
    _save_tiny_gpt2(ckpt)
    (ckpt / "evil.py").write_text(f"import os\nos.mkdir({str(marker)!r})\n")
    conf = json.loads((ckpt / "config.json").read_text())
    conf["model_type"] = "evil-gpt"
    conf["auto_map"] = {"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilModel"}
    (ckpt / "config.json").write_text(json.dumps(conf))
    t0 = time.perf_counter()
    with pytest.raises(ValueError, match="trust_remote_code"):
        qs.load_model(ckpt)
    assert not marker.exists(), "loading imported code from the checkpoint directory"
    assert time.perf_counter() - t0 < 10  # no interactive "trust remote code?" prompt


@pytest.mark.parametrize("name", ["solu-1l", "attn-only-2l", "microsoft/phi-2"])
def test_official_names_that_run_hub_code_need_opt_in(name: str) -> None:
    t0 = time.perf_counter()
    with pytest.raises(ValueError, match="trust_remote_code=True") as info:
        qs.load_model(name)
    assert name in str(info.value) and "arbitrary code" in str(info.value)
    # with the opt-in it proceeds to the ordinary (offline here) route
    with pytest.raises(ConnectionError, match="offline"):
        qs.load_model(name, trust_remote_code=True)
    assert time.perf_counter() - t0 < 10


# ------------------------------------------------------------------- static audit
PACKAGE = Path(qs.__file__).resolve().parent
_BANNED_CALLS = {"eval", "exec", "compile", "__import__"}
_BANNED_MODULES = {"pickle", "cPickle", "dill", "cloudpickle", "marshal", "shelve", "joblib"}


def unsafe_calls(source: str, filename: str = "<src>") -> list[str]:
    """Places in ``source`` that could run code from data: eval/exec/compile/__import__, any use of
    pickle-like modules, torch.load without weights_only=True, numpy.load(allow_pickle=True),
    yaml.load, and trust_remote_code=True."""
    problems = []
    for node in ast.walk(ast.parse(source, filename)):
        where = f"{filename}:{getattr(node, 'lineno', '?')}"
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            mods = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            problems += [f"{where}: imports {m}" for m in mods if m.split(".")[0] in _BANNED_MODULES]
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        kw = {k.arg: k.value for k in node.keywords}
        if isinstance(func, ast.Name) and func.id in _BANNED_CALLS:
            problems.append(f"{where}: calls {func.id}()")
        if isinstance(func, ast.Attribute):
            owner = func.value.id if isinstance(func.value, ast.Name) else ""
            if func.attr == "load" and owner == "torch":
                wo = kw.get("weights_only")
                if not (isinstance(wo, ast.Constant) and wo.value is True):
                    problems.append(f"{where}: torch.load without weights_only=True")
            if func.attr == "load" and owner in ("np", "numpy"):
                ap = kw.get("allow_pickle")
                if (isinstance(ap, ast.Constant) and ap.value is not False) or (
                    ap is not None and not isinstance(ap, ast.Constant)
                ):
                    problems.append(f"{where}: numpy.load with allow_pickle")
            if func.attr in ("load", "unsafe_load") and owner == "yaml":
                problems.append(f"{where}: yaml.{func.attr}")
            if owner in _BANNED_MODULES:
                problems.append(f"{where}: {owner}.{func.attr}()")
            if func.attr in _BANNED_CALLS and owner == "builtins":
                problems.append(f"{where}: builtins.{func.attr}()")
        tr = kw.get("trust_remote_code")
        if isinstance(tr, ast.Name) and tr.id == "trust_remote_code":
            problems.append(f"{where}: passes the caller's trust_remote_code")
        elif tr is not None and not (isinstance(tr, ast.Constant) and tr.value is False):
            problems.append(f"{where}: passes trust_remote_code other than False")
    return problems


def test_audit_catches_unsafe_code() -> None:
    """The audit itself must be able to fail."""
    bad = (
        "import pickle\nimport torch, numpy as np, yaml, builtins\n"
        "eval(s)\nexec(s)\npickle.loads(b)\ntorch.load(f)\ntorch.load(f, weights_only=False)\n"
        "np.load(f, allow_pickle=True)\nyaml.load(f)\nbuiltins.eval(s)\n"
        "m.from_pretrained(p, trust_remote_code=True)\n"
    )
    flagged = {int(p.split(":")[1]) for p in unsafe_calls(bad)}
    assert flagged == {1, 3, 4, 5, 6, 7, 8, 9, 10, 11}  # every line but the harmless imports
    good = "import torch\nmodel.eval()\ntorch.load(f, weights_only=True)\nm.from_pretrained(p, trust_remote_code=False)\n"
    assert unsafe_calls(good) == []


def test_package_never_evals_or_unpickles() -> None:
    files = sorted(PACKAGE.rglob("*.py"))
    assert len(files) >= 8
    problems = [p for f in files for p in unsafe_calls(f.read_text(), str(f.relative_to(PACKAGE.parent)))]
    # one exception: the bridge hands an official name's loader the caller's own opt-in (default False;
    # load_model refuses hub code without it, test_official_names_that_run_hub_code_need_opt_in)
    opt_in = [p for p in problems if p.endswith("passes the caller's trust_remote_code")]
    assert [p.split(":")[0] for p in opt_in] == ["qk_subspace/model/backends/bridge.py"]
    assert [p for p in problems if p not in opt_in] == []

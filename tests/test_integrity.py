"""Model integrity under faults: every parameter is bit for bit what it was after any failure.

Fault injection replaces ``ParameterEdit._write`` (the one function that writes weights) by a
version that raises on chosen calls -- once, twice in a row (defeating the single retry), or
forever -- with an ordinary exception or ``KeyboardInterrupt``, before or after the write. Each
scenario is run with the fault at every call index; afterwards the sha256 of every parameter must
equal the one taken before. Real SIGINTs are sent from inside writes to check that an interrupt
cannot stop a write or restore loop half-way.
"""

from __future__ import annotations

import contextlib
import hashlib
import signal
from collections.abc import Callable

import pytest
import torch

import qk_subspace as qs
from qk_subspace.edits.parameter_edit import ParameterEdit
from qk_subspace.edits.qk import QKEdit
from tests.conftest import make_model

_ORIGINAL_WRITE = ParameterEdit._write


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    """Tiny models gain nothing from intra-op threads; on a loaded shared CPU, one thread is ~50x faster."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def param_hashes(model: torch.nn.Module) -> dict[str, str]:
    """sha256 of the raw bytes (plus dtype and shape) of every parameter."""
    out = {}
    for name, p in model.named_parameters():
        t = p.detach().cpu().contiguous().reshape(-1)
        h = hashlib.sha256(t.view(torch.uint8).numpy().tobytes())
        h.update(f"{t.dtype}{tuple(p.shape)}".encode())
        out[name] = h.hexdigest()
    return out


def _target(model, seed: int) -> torch.Tensor:
    cfg = model.cfg
    g = torch.Generator().manual_seed(seed)
    return torch.randn(cfg.n_layers, cfg.n_heads, cfg.d_head, cfg.d_head, generator=g, dtype=torch.float64)


class Boom(Exception):
    pass


class FaultyWrite:
    """Stand-in for ``ParameterEdit._write`` that fails on chosen call numbers (1-based)."""

    def __init__(
        self,
        fail: Callable[[int], bool] = lambda n: False,
        exc: type[BaseException] = Boom,
        write_first: bool = False,
        sigint: Callable[[int], bool] = lambda n: False,
    ) -> None:
        self.fail, self.exc, self.write_first, self.sigint = fail, exc, write_first, sigint
        self.calls = 0

    def __call__(self, param: torch.nn.Parameter, value: torch.Tensor) -> None:
        self.calls += 1
        if self.sigint(self.calls):
            signal.raise_signal(signal.SIGINT)
        if self.fail(self.calls):
            if self.write_first:
                _ORIGINAL_WRITE(param, value)
            raise self.exc(f"injected fault at write {self.calls}")
        _ORIGINAL_WRITE(param, value)


def _install(monkeypatch: pytest.MonkeyPatch, fault: FaultyWrite) -> None:
    monkeypatch.setattr(ParameterEdit, "_write", staticmethod(fault))


def _restore_all(model) -> None:
    """What a user does after a permanent restore failure: retry, innermost edit first."""
    for edit in reversed(qs.active_edits(model)):
        edit.restore()


# ------------------------------------------------------------------ scenarios
def _single(model) -> None:
    with qs.inject_qk(model, _target(model, 0)):
        raise Boom("inside the block")


def _nested(model) -> None:
    names = [n for n, _ in model.named_parameters()]
    emb = names[0]
    other = {emb: torch.zeros_like(dict(model.named_parameters())[emb])}
    with (
        qs.inject_qk(model, _target(model, 0)),
        qs.ParameterEdit(model, other, name="zero-embedding"),
        qs.inject_qk(model, _target(model, 1), heads=[(1, 0), (1, 2)]),
    ):
        raise Boom("inside the innermost block")


def _nested_clean(model) -> None:
    """Normal exits all the way (faults then hit the restore of nested edits)."""
    with qs.inject_qk(model, _target(model, 0)), qs.inject_qk(model, _target(model, 1), heads=[0, 5]):
        pass


SCENARIOS = {"single": _single, "nested": _nested, "nested_clean": _nested_clean}


def _count_writes(monkeypatch: pytest.MonkeyPatch, model, scenario) -> int:
    counter = FaultyWrite()
    _install(monkeypatch, counter)
    with contextlib.suppress(Boom):
        scenario(model)
    return counter.calls


#: (pattern, exception, write the value before raising?): every combination.
FAULTS = [
    (p, e, w) for p in ("once", "twice", "forever") for e in (Boom, KeyboardInterrupt) for w in (False, True)
]
PATTERNS: dict[str, Callable[[int], Callable[[int], bool]]] = {
    "once": lambda k: lambda n: n == k,
    "twice": lambda k: lambda n: n in (k, k + 1),  # defeats the single retry in restore
    "forever": lambda k: lambda n: n >= k,
}


@pytest.mark.parametrize("kind", ["mha", "gqa"])
@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_fault_at_every_write_leaves_model_intact(
    monkeypatch: pytest.MonkeyPatch, kind: str, scenario: str
) -> None:
    model = make_model(kind)
    before = param_hashes(model)
    run = SCENARIOS[scenario]
    n_writes = _count_writes(monkeypatch, model, run)
    assert n_writes >= 4 and param_hashes(model) == before
    for k in range(1, n_writes + 1):
        for pattern, exc, write_first in FAULTS:
            _install(monkeypatch, FaultyWrite(PATTERNS[pattern](k), exc, write_first))
            with pytest.raises((Boom, KeyboardInterrupt, RuntimeError)) as info:
                run(model)
            where = f"{scenario}: {exc.__name__} {pattern} at write {k}/{n_writes}, write_first={write_first}"
            if pattern == "once":
                # a single failed write is always recovered: restore completes, no edit stays active
                assert qs.active_edits(model) == [], where
                assert param_hashes(model) == before, where
            if qs.active_edits(model):
                # only a repeated failure can leave an edit active, and it says so
                msgs = []
                e: BaseException | None = info.value
                while e is not None:
                    msgs.append(str(e))
                    e = e.__context__
                assert any("could not restore" in m for m in msgs), (where, msgs)
            monkeypatch.setattr(ParameterEdit, "_write", staticmethod(_ORIGINAL_WRITE))
            _restore_all(model)
            assert qs.active_edits(model) == [], where
            assert param_hashes(model) == before, where


@pytest.mark.parametrize("exc", [Boom, KeyboardInterrupt])
def test_exception_or_interrupt_inside_block(exc: type[BaseException]) -> None:
    model = make_model("gqa")
    before = param_hashes(model)
    for depth in (1, 2, 3):
        with pytest.raises(exc), qs.inject_qk(model, _target(model, 0)):
            if depth > 1:
                with qs.inject_qk(model, _target(model, 1), heads=[1]):
                    if depth > 2:
                        with qs.inject_qk(model, _target(model, 2)):
                            raise exc("deep")
                    raise exc("middle")
            raise exc("outer")
        assert param_hashes(model) == before
        assert qs.active_edits(model) == []


def test_fault_in_after_enter_hook_restores(monkeypatch: pytest.MonkeyPatch) -> None:
    """`with` never calls __exit__ if __enter__ raises: the writes must be undone inside __enter__."""
    model = make_model("mha")
    before = param_hashes(model)
    for exc in (Boom, KeyboardInterrupt):

        def bad_hook(self: QKEdit, exc: type[BaseException] = exc) -> None:
            raise exc("residual computation failed")

        monkeypatch.setattr(QKEdit, "_after_enter", bad_hook)
        with pytest.raises(exc), qs.inject_qk(model, _target(model, 0)):
            pytest.fail("the block must not run")
        assert param_hashes(model) == before
        assert qs.active_edits(model) == []


def test_error_in_plan_of_second_layer_writes_nothing() -> None:
    model = make_model("mha")
    with torch.no_grad():
        model.blocks[1].attn.W_K[3, :, 1] = 0.0  # W_K^T W_K singular for L1H3 (layer 0 is fine)
    before = param_hashes(model)
    v0 = qs.edits.parameter_edit.weights_version(model)
    with pytest.raises(ValueError, match="L1H3"), qs.inject_qk(model, _target(model, 0)):
        pass
    assert param_hashes(model) == before and qs.edits.parameter_edit.weights_version(model) == v0


def test_interrupt_in_forward_pass_of_sweep_leaves_model_intact() -> None:
    """A Ctrl-C while sweep_k evaluates an edited model (hooked into the forward pass)."""
    model = make_model("mha")
    tokens = torch.randint(0, 50, (4, 16), generator=torch.Generator().manual_seed(0))
    pca = qs.HeadPCA().fit(qs.qk_matrices(model))
    before = param_hashes(model)

    def interrupt(act: torch.Tensor, hook) -> None:
        if qs.active_edits(model):
            raise KeyboardInterrupt

    model.add_hook("blocks.1.hook_resid_pre", interrupt)
    try:
        with pytest.raises(KeyboardInterrupt):
            qs.sweep_k(model, pca, tokens, [2, 5], progress=False, n_boot=10)
    finally:
        model.reset_hooks()
    assert param_hashes(model) == before and qs.active_edits(model) == []


# ------------------------------------------------------------- real SIGINTs
def test_sigint_during_enter_writes_aborts_and_restores(monkeypatch: pytest.MonkeyPatch) -> None:
    model = make_model("mha")
    before = param_hashes(model)
    _install(monkeypatch, FaultyWrite(sigint=lambda n: n == 1))
    ran = []
    with pytest.raises(KeyboardInterrupt), qs.inject_qk(model, _target(model, 0)):
        ran.append(True)
    assert not ran
    assert param_hashes(model) == before and qs.active_edits(model) == []


def test_repeated_sigint_during_restore_cannot_stop_it(monkeypatch: pytest.MonkeyPatch) -> None:
    """Two Ctrl-C in a row during restore (more than one retry could absorb): SIGINT is held back
    while restoring, so every parameter is restored and one KeyboardInterrupt follows."""
    model = make_model("mha")
    before = param_hashes(model)
    # writes 1-2: entry (2 layers); 3-4: restore
    _install(monkeypatch, FaultyWrite(sigint=lambda n: n in (3, 4)))
    with pytest.raises(KeyboardInterrupt), qs.inject_qk(model, _target(model, 0)):
        pass
    assert param_hashes(model) == before and qs.active_edits(model) == []
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handler put back


def test_sigint_handler_is_put_back_and_custom_handlers_called(monkeypatch: pytest.MonkeyPatch) -> None:
    model = make_model("mha")
    before = param_hashes(model)
    seen = []

    def custom(signum, frame) -> None:
        seen.append(signum)

    old = signal.signal(signal.SIGINT, custom)
    try:
        _install(monkeypatch, FaultyWrite(sigint=lambda n: n == 2))
        with qs.inject_qk(model, _target(model, 0)):
            assert seen == [signal.SIGINT]  # delivered right after the write loop, not during it
        assert signal.getsignal(signal.SIGINT) is custom
    finally:
        signal.signal(signal.SIGINT, old)
    assert param_hashes(model) == before


# ------------------------------------------------------------ concurrent misuse
def test_second_edit_on_same_model_composes() -> None:
    model = make_model("gqa")
    before = param_hashes(model)
    t1, t2 = _target(model, 1), _target(model, 2)
    with qs.inject_qk(model, t1):
        with qs.inject_qk(model, t2, heads=[(0, 1), (1, 3)]) as inner:
            W = qs.qk_matrices(model)
            mask = inner.heads
            assert (W[mask] - t2[mask]).abs().max() < 1e-4  # inner heads: the inner target
            assert (W[~mask] - t1[~mask]).abs().max() < 1e-4  # others: still the outer target
            assert len(qs.active_edits(model)) == 2
        assert (qs.qk_matrices(model) - t1).abs().max() < 1e-4
    assert param_hashes(model) == before


def test_out_of_order_exit_raises_and_changes_nothing() -> None:
    model = make_model("mha")
    before = param_hashes(model)
    outer = qs.inject_qk(model, _target(model, 1))
    inner = qs.inject_qk(model, _target(model, 2), heads=[3])
    outer.__enter__()
    inner.__enter__()
    during = param_hashes(model)
    with pytest.raises(RuntimeError, match="reverse order") as info:
        outer.__exit__(None, None, None)
    assert "active_edits" in str(info.value) and inner.name in str(info.value)
    assert param_hashes(model) == during and outer.active and inner.active
    inner.__exit__(None, None, None)
    outer.__exit__(None, None, None)
    assert param_hashes(model) == before and qs.active_edits(model) == []


def test_entering_same_edit_twice_raises_and_reentry_after_exit_works() -> None:
    model = make_model("mha")
    before = param_hashes(model)
    edit = qs.inject_qk(model, _target(model, 1))
    with edit:
        during = param_hashes(model)
        with pytest.raises(RuntimeError, match="already active"), edit:
            pass
        assert param_hashes(model) == during and edit.active
    assert param_hashes(model) == before
    with edit:  # a finished edit can be used again
        assert param_hashes(model) == during
    assert param_hashes(model) == before


def test_weights_changed_inside_block_are_restored_too() -> None:
    """An optimiser step on the edited weights inside the block is undone on exit."""
    model = make_model("mha")
    before = param_hashes(model)
    tokens = torch.randint(0, 50, (2, 16), generator=torch.Generator().manual_seed(0))
    slots = qs.model.weights.weight_slots(model)
    wq = [slots[f"blocks.{layer}.attn.W_Q"].parameter for layer in range(model.cfg.n_layers)]
    with qs.inject_qk(model, _target(model, 0)):
        opt = torch.optim.SGD(wq, lr=0.1)
        model(tokens, return_type="loss").backward()
        opt.step()
    for p in model.parameters():
        p.grad = None
    assert param_hashes(model) == before
    assert all(p.requires_grad for p in wq)


def test_edit_inside_inference_and_no_grad_modes() -> None:
    model = make_model("mha")
    before = param_hashes(model)
    with torch.inference_mode(), qs.inject_qk(model, _target(model, 0)):
        pass
    with torch.no_grad(), pytest.raises(Boom), qs.inject_qk(model, _target(model, 0)):
        raise Boom
    assert param_hashes(model) == before
    # a snapshot taken in inference mode can be restored outside it
    edit = qs.inject_qk(model, _target(model, 0))
    with torch.inference_mode():
        edit.__enter__()
    edit.__exit__(None, None, None)
    assert param_hashes(model) == before


def test_plan_values_overflowing_parameter_dtype_are_rejected() -> None:
    model = make_model("mha")  # float32
    before = param_hashes(model)
    name = "blocks.0.attn.W_Q"
    huge = torch.full(model.blocks[0].attn.W_Q.shape, 1e300, dtype=torch.float64)  # finite in float64
    plan = {"blocks.1.attn.W_Q": model.blocks[1].attn.W_Q * 2, name: huge}
    with (
        pytest.raises(ValueError, match=r"blocks\.0\.attn\.W_Q.*NaN or Inf.*float32"),
        qs.ParameterEdit(model, plan),
    ):
        pass
    assert param_hashes(model) == before


def test_permanent_restore_failure_with_pending_ctrl_c_keeps_both(monkeypatch: pytest.MonkeyPatch) -> None:
    """A write that keeps failing during restore while Ctrl-C is pressed: the KeyboardInterrupt is
    delivered, chained to the RuntimeError naming the parameter, and a later restore() recovers."""
    model = make_model("mha")
    before = param_hashes(model)
    # writes 1-2: entry; 3-4: both attempts for blocks.1.attn.W_Q fail, SIGINT during the first
    _install(monkeypatch, FaultyWrite(fail=lambda n: n in (3, 4), sigint=lambda n: n == 3))
    with pytest.raises(KeyboardInterrupt) as info, qs.inject_qk(model, _target(model, 0)):
        pass
    ctx = info.value.__context__
    assert isinstance(ctx, RuntimeError) and "blocks.1.attn.W_Q" in str(ctx) and "restore()" in str(ctx)
    assert param_hashes(model) != before and len(qs.active_edits(model)) == 1
    monkeypatch.setattr(ParameterEdit, "_write", staticmethod(_ORIGINAL_WRITE))
    _restore_all(model)
    assert param_hashes(model) == before and qs.active_edits(model) == []


# ------------------------------------------------- only ParameterEdit writes weights
_WRITE_METHODS = {"copy_", "set_", "load_state_dict", "load_and_process_state_dict", "register_parameter"}
#: where each of those calls is allowed: ParameterEdit._write, and loading a checkpoint into a freshly
#: built HookedTransformer or TransformerBridge (no weights to restore yet)
_ALLOWED = {
    ("parameter_edit.py", "copy_"),
    ("hooked.py", "load_and_process_state_dict"),
    ("bridge.py", "load_state_dict"),
}


def weight_writes(source: str) -> list[tuple[int, str]]:
    """Calls that can overwrite parameters in place, and assignments to ``.data``."""
    import ast

    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            if node.func.attr in _WRITE_METHODS:
                found.append((node.lineno, node.func.attr))
            chain = ast.unparse(node.func)
            if chain.startswith(("torch.nn.init.", "nn.init.", "init.")):
                found.append((node.lineno, chain))
        if isinstance(node, (ast.Assign, ast.AugAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            found += [
                (node.lineno, ".data =") for t in targets if isinstance(t, ast.Attribute) and t.attr == "data"
            ]
    return found


def test_weight_write_audit_can_fail() -> None:
    src = "p.data = x\np.copy_(x)\nm.load_state_dict(sd)\ntorch.nn.init.zeros_(p)\np.data += 1\nx.add_(1)\n"
    assert sorted(line for line, _ in weight_writes(src)) == [1, 2, 3, 4, 5]  # not x.add_ on line 6


def test_only_parameter_edit_writes_weights() -> None:
    from pathlib import Path

    package = Path(qs.__file__).resolve().parent
    offenders = [
        (f.name, line, what)
        for f in sorted(package.rglob("*.py"))
        for line, what in weight_writes(f.read_text())
        if (f.name, what) not in _ALLOWED
    ]
    assert offenders == [], (
        "weights must be written only through qk_subspace.edits.parameter_edit.ParameterEdit"
    )
    src = (package / "edits" / "parameter_edit.py").read_text()
    assert src.count(".copy_(") == 1  # the single write, in ParameterEdit._write

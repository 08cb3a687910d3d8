from __future__ import annotations

import numpy as np
import pytest
import torch

import qk_subspace as qs
from tests.conftest import GPT2_TOKENIZER, WIKITEXT, make_model, requires_shared


def _reference_nll(model, tokens: torch.Tensor) -> np.ndarray:
    """Hand-written float64 cross-entropy on the model's logits."""
    with torch.no_grad():
        logits = model(tokens).double()
    logp = logits[:, :-1] - torch.logsumexp(logits[:, :-1], dim=-1, keepdim=True)
    nll = -torch.gather(logp, -1, tokens[:, 1:, None]).squeeze(-1)
    return nll.mean(dim=1).numpy()


@pytest.mark.parametrize("kind", ["mha", "gqa"])
def test_perplexity_matches_hand_written_loss(kind: str) -> None:
    model = make_model(kind)
    toks = torch.randint(0, 50, (6, 20), generator=torch.Generator().manual_seed(2))
    res = qs.perplexity(model, toks, batch_size=4, progress=False)
    ref = _reference_nll(model, toks)
    np.testing.assert_allclose(res.nll_per_chunk, ref, rtol=1e-6)
    assert abs(res.mean_nll - ref.mean()) < 1e-6
    assert abs(res.ppl - np.exp(ref.mean())) / res.ppl < 1e-6
    assert res.n_tokens == 6 * 19
    # TransformerLens' own loss agrees too
    assert abs(model(toks, return_type="loss").item() - res.mean_nll) < 1e-5
    for bs in (1, 5, 6, 100):
        other = qs.perplexity(model, toks, batch_size=bs, progress=False)
        np.testing.assert_allclose(other.nll_per_chunk, res.nll_per_chunk, rtol=1e-6)


def test_paired_ratio_ci() -> None:
    rng = np.random.default_rng(0)
    a = qs.PerplexityResult(ppl=0, mean_nll=0, nll_per_chunk=rng.normal(3, 0.1, 50), n_tokens=0)
    b = qs.PerplexityResult(ppl=0, mean_nll=0, nll_per_chunk=a.nll_per_chunk + 0.1, n_tokens=0)
    ci = qs.paired_ratio(a, b, seed=1)
    assert abs(ci.ratio - np.exp(0.1)) < 1e-12 and abs(ci.low - ci.ratio) < 1e-9  # constant shift
    c = qs.PerplexityResult(
        ppl=0, mean_nll=0, nll_per_chunk=a.nll_per_chunk + rng.normal(0.1, 0.05, 50), n_tokens=0
    )
    ci = qs.paired_ratio(a, c, seed=1)
    assert ci.low < ci.ratio < ci.high
    assert ci == qs.paired_ratio(a, c, seed=1)


def test_chunking_and_validation() -> None:
    toks = qs.evaluation.tokens.chunk_tokens(list(range(1000)), n_tokens=900, ctx=256)
    assert toks.shape == (3, 256) and toks[1, 0] == 256
    with pytest.raises(ValueError, match="n_tokens"):
        qs.evaluation.tokens.chunk_tokens(list(range(1000)), n_tokens=100, ctx=256)
    with pytest.raises(ValueError, match="too short"):
        qs.evaluation.tokens.chunk_tokens(list(range(100)), n_tokens=None, ctx=256)
    model = make_model("mha")
    with pytest.raises(ValueError, match="rank 2"):
        qs.perplexity(model, torch.zeros(10, dtype=torch.long), progress=False)
    with pytest.raises(TypeError, match="integer"):
        qs.perplexity(model, torch.zeros(2, 10), progress=False)
    with pytest.raises(ValueError, match="vocabulary"):
        qs.perplexity(model, torch.full((2, 10), 50), progress=False)
    with pytest.raises(ValueError, match="n_ctx"):
        qs.perplexity(model, torch.zeros(2, 33, dtype=torch.long), progress=False)


def test_sweep_k_k_all_and_mean_head() -> None:
    model = make_model("mha")
    toks = torch.randint(0, 50, (4, 16), generator=torch.Generator().manual_seed(3))
    pca = qs.HeadPCA().fit(qs.qk_matrices(model))
    df = qs.sweep_k(model, pca, toks, [0, 2, 7, 8], progress=False, n_boot=200)
    assert list(df["K"]) == [0, 2, 7, 8]
    assert df.attrs["k_all_ok"] and abs(df.attrs["k_all_ratio"] - 1) < 1e-5
    assert list(df["is_all"]) == [False, False, True, True]
    assert df.loc[0, "cumulative_variance"] == 0.0
    assert (df["ratio_low"] <= df["ratio"] + 1e-12).all() and (df["ratio"] <= df["ratio_high"] + 1e-12).all()
    # independent check of one point
    with qs.inject_qk(model, pca.reconstruct(2)):
        ref = qs.perplexity(model, toks, progress=False).ppl
    assert abs(df.loc[1, "ppl"] - ref) < 1e-9


@requires_shared
def test_wikitext_file_route_token_count() -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(GPT2_TOKENIZER)
    rows = qs.evaluation.tokens.wikitext2_rows(text_file=WIKITEXT)
    assert len(rows) == 4358
    ids = tok("\n\n".join(rows), add_special_tokens=False, verbose=False)["input_ids"]
    assert len(ids) == 287_644
    toks = qs.load_wikitext2(tok, text_file=WIKITEXT)
    assert toks.shape == (195, 1024)
    assert toks.flatten().tolist() == ids[: 195 * 1024]

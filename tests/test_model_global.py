"""GlobalModel (model_global.py) against the similarity formulas of docs/METHOD.md section 4 (tests/references)."""
from __future__ import annotations

import pytest
import torch

from loss import msb_loss
from model_global import GlobalModel
from tests.references import global_similarity_reference

TOL = 1e-6
VOCAB = 25
LENGTHS = [4, 7, 3, 5, 2, 6]
OPT = dict(cnn_dim=12, bovw_dim=7, embed_size=8, word_dim=6, num_layers=1, bi_gru=True,
           text_pooling="padded_mean", alpha_1=0.3, alpha_2=0.6)


def make_model(pooling: str = "padded_mean", seed: int = 0) -> GlobalModel:
    torch.manual_seed(seed)
    return GlobalModel(dict(OPT, text_pooling=pooling), VOCAB).double()


def make_batch(seed: int = 0, lengths=LENGTHS, width: int | None = None):
    g = torch.Generator().manual_seed(seed)
    n = len(lengths)
    cnn = torch.randn(n, OPT["cnn_dim"], generator=g, dtype=torch.float64)
    bovw = torch.rand(n, OPT["bovw_dim"], generator=g, dtype=torch.float64)
    caps = torch.randint(4, VOCAB, (n, width or max(lengths)), generator=g)
    for i, m in enumerate(lengths):
        caps[i, m:] = 0
    return cnn, bovw, caps, torch.tensor(lengths)


@pytest.mark.parametrize("pooling", ["padded_mean", "masked_mean"])
def test_forward_matches_spec_formulas(pooling):
    model = make_model(pooling)
    cnn, bovw, caps, lengths = make_batch()
    with torch.no_grad():
        out = model(cnn, bovw, caps, lengths)
        ref = global_similarity_reference(model, cnn, bovw, caps, lengths, pooling)
    assert set(out) == {"P", "A1", "A2"}
    for key in ("P", "A1", "A2"):
        assert out[key].shape == (len(LENGTHS), len(LENGTHS))
        assert out[key].dtype == torch.float64
        assert torch.allclose(out[key], ref[key], atol=TOL, rtol=0), key
    # not symmetric: the row/column orientation is really checked
    assert not torch.allclose(out["P"], out["P"].T, atol=1e-4)
    assert not torch.allclose(out["A2"], out["A2"].T, atol=1e-4)


def test_rows_are_images():
    model = make_model()
    cnn, bovw, caps, lengths = make_batch(1)
    with torch.no_grad():
        out = model(cnn, bovw, caps, lengths)
        moved = model(cnn.flip(0), bovw.flip(0), caps, lengths)   # images reordered, captions not
    assert torch.allclose(moved["P"], out["P"].flip(0), atol=1e-12)
    assert torch.allclose(moved["A1"], out["A1"].flip(0), atol=1e-12)
    assert torch.allclose(moved["A2"], out["A2"].flip(0, 1), atol=1e-12)


def test_pooling_modes_differ_as_specified():
    cnn, bovw, caps, lengths = make_batch(2)
    with torch.no_grad():
        padded = make_model("padded_mean")(cnn, bovw, caps, lengths)["P"]
        masked = make_model("masked_mean")(cnn, bovw, caps, lengths)["P"]
    # same weights (same seed): column j of padded_mean = column j of masked_mean * length_j / longest
    scale = lengths.double() / lengths.max()
    assert torch.allclose(padded, masked * scale[None, :], atol=1e-12, rtol=0)
    assert not torch.allclose(padded, masked, atol=1e-4)


def test_extra_caption_padding_changes_nothing():
    model = make_model()
    cnn, bovw, caps, lengths = make_batch(3)
    wide = torch.cat([caps, torch.zeros(len(LENGTHS), 4, dtype=caps.dtype)], dim=1)
    with torch.no_grad():
        a, b = model(cnn, bovw, caps, lengths), model(cnn, bovw, wide, lengths)
    for key in a:
        assert torch.allclose(a[key], b[key], atol=1e-12, rtol=0)


@pytest.mark.parametrize("pooling", ["padded_mean", "masked_mean"])
def test_encode_primary_and_primary_similarity(pooling):
    model = make_model(pooling, seed=4)
    cnn, bovw, caps, lengths = make_batch(4)
    with torch.no_grad():
        images, texts = model.encode_primary(cnn, caps, lengths)
        sims = model.primary_similarity(images, texts)
        out = model(cnn, bovw, caps, lengths)
        ref = global_similarity_reference(model, cnn, bovw, caps, lengths, pooling)
    assert images.shape == (len(LENGTHS), OPT["embed_size"]) and texts.shape == images.shape
    assert torch.allclose(sims, out["P"], atol=1e-12, rtol=0)
    assert torch.allclose(sims, ref["P"], atol=TOL, rtol=0)
    # rectangular use at evaluation: fewer images than captions, rows still images
    sub = model.primary_similarity(images[:2], texts)
    assert sub.shape == (2, len(LENGTHS)) and torch.allclose(sub, ref["P"][:2], atol=TOL, rtol=0)


def test_loss_weights_use_alphas():
    model = make_model()
    assert model.loss_weights() == {"P": 1.0, "A1": 0.3, "A2": 0.6}
    assert GlobalModel(dict(OPT, alpha_1=0.8, alpha_2=0.8), VOCAB).loss_weights() == \
        {"P": 1.0, "A1": 0.8, "A2": 0.8}


def test_weighted_msb_gradients_reach_all_four_encoders():
    model = make_model(seed=5)
    cnn, bovw, caps, lengths = make_batch(5, lengths=[4, 7, 3, 5, 2, 6, 3, 5])
    labels = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    sims = model(cnn, bovw, caps, lengths)
    weights = model.loss_weights()
    loss = sum(weights[k] * msb_loss(sims[k], labels) for k in ("P", "A1", "A2"))
    assert torch.isfinite(loss) and loss.item() != 0
    loss.backward()
    for name in ("img_cnn", "img_bovw", "txt_cnn", "txt_bovw"):
        params = list(getattr(model, name).named_parameters())
        assert params
        for pname, p in params:
            assert p.grad is not None, f"{name}.{pname} got no gradient"
            assert torch.isfinite(p.grad).all(), f"{name}.{pname} has a non-finite gradient"
        assert sum(p.grad.abs().sum() for _, p in params) > 0, f"{name} gradient is all zero"

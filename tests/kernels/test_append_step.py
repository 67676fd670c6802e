"""The static cache's one-launch step prologue (:mod:`kvtune.kernels.append_step`) against PyTorch: the token's raw
and framed rows at the device row count, the query in the keys' frame; several head dims and query groups."""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton", reason="triton is not installed")

from kvtune.kernels.append_step import append_step
from kvtune.layout import LayerSpan
from kvtune.quant.rotation import rotation

DEV = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("d, hkv, n_rep, rot_k, rot_v, center", [
    (64, 2, 2, "hadamard", "hadamard", True),
    (80, 1, 8, "orthogonal", "none", False),   # head dim 80 (padded lanes), MQA-like group of 8
    (128, 4, 1, "none", "orthogonal", True),   # no key rotation: the query comes back as it was
    (256, 2, 4, "hadamard", "none", False),
])
def test_append_step_matches_pytorch(d: int, hkv: int, n_rep: int, rot_k: str, rot_v: str, center: bool) -> None:
    gen = torch.Generator().manual_seed(d)
    b, cap, row = 2, 9, 4
    q = torch.randn(b, 1, hkv * n_rep, d, generator=gen).to(DEV).transpose(1, 2)  # the model's strided query
    k, v = (torch.randn(b, hkv, 1, d, generator=gen).to(DEV) for _ in range(2))  # float32: cast to fp16 inside
    win_k, win_v = (torch.randn(b, hkv, cap, d, generator=gen).half().to(DEV) for _ in range(2))
    ext_k, ext_v = win_k.clone() * 0, win_v.clone() * 0
    before = [t.clone() for t in (win_k, win_v, ext_k, ext_v)]
    means = [torch.randn(hkv, d, generator=gen).half().to(DEV) if center else None for _ in range(2)]
    mats = [rotation(r).on(d, torch.device(DEV)) for r in (rot_k, rot_v)]  # float32 R: what PyTorch multiplies by
    splits = [rotation(r).split_half(d, torch.device(DEV)) for r in (rot_k, rot_v)]
    framed = [m is not None or mu is not None for m, mu in zip(mats, means)]
    n_extra = torch.tensor([row], dtype=torch.int32, device=DEV)
    i32 = {"dtype": torch.int32, "device": DEV}
    visible = (torch.tensor([0, 3], **i32), torch.tensor([32], **i32), torch.zeros(b, **i32), torch.zeros(b, **i32))
    qo = append_step(q, k, v, win_k, win_v, ext_k if framed[0] else win_k, ext_v if framed[1] else win_v, n_extra,
                     *splits, *means, visible, sinks=2)

    def frame(x: torch.Tensor, mat: torch.Tensor | None, mean: torch.Tensor | None) -> torch.Tensor:
        x = x.half()
        if mean is not None:
            x = (x.float() - mean.float()[:, None]).half()
        return (x.float() @ mat).half() if mat is not None else x

    for got, old, x, mat, mean, f in ((win_k, before[0], k, None, None, True), (win_v, before[1], v, None, None, True),
                                      (ext_k, before[2], k, mats[0], means[0], framed[0]),
                                      (ext_v, before[3], v, mats[1], means[1], framed[1])):
        want = old.clone()
        if f:
            want[:, :, row : row + 1] = frame(x, mat, mean)
        torch.testing.assert_close(got.float(), want.float(), atol=2e-3, rtol=0)
    want_q = frame(q, mats[0], None) if mats[0] is not None else q
    torch.testing.assert_close(qo.float(), want_q.float(), atol=2e-3, rtol=0)
    assert int(n_extra) == row  # the count is the caller's to advance


@pytest.mark.parametrize("span", ["global", "sliding:8", "sliding:40", "chunked:16"])
@pytest.mark.parametrize("sinks, nq, row", [(0, 32, 5), (4, 32, 9), (4, 0, 2), (4, 0, 6)])
def test_append_step_writes_what_the_query_sees(span: str, sinks: int, nq: int, row: int) -> None:
    """``qvis``/``wvis``: the first visible quantized token and extra row, from the left padding and the span's first
    visible position of the query at ``nq + row`` (stream ``[sinks][quantized][window]``), as kvtune.layout says."""
    sp = LayerSpan.from_str(span)
    i32 = {"dtype": torch.int32, "device": DEV}
    pads = [0, 1, 3, 5, 20, 37]
    b, d, cap = len(pads), 16, 12
    pad = torch.tensor(pads, **i32)
    qvis, wvis = torch.full((b,), -1, **i32), torch.full((b,), -1, **i32)
    win = torch.zeros(b, 1, cap, d, dtype=torch.float16, device=DEV)
    x = torch.zeros(b, 1, 1, d, device=DEV)
    append_step(x, x, x, win, win.clone(), win, win, torch.tensor([row], **i32), None, None, None, None,
                (pad, torch.tensor([nq], **i32), qvis, wvis), sinks, sp)
    for i, p in enumerate(pads):
        t = nq + row  # the query's position
        e = max(p, int(sp.first_visible(t, p)))
        assert int(qvis[i]) == max(e - sinks, 0)
        assert int(wvis[i]) == min(e, sinks) + max(e - sinks - nq, 0)
        # the rows from wvis to the token's own row are exactly the visible extra positions
        positions = [r if r < sinks else nq + r for r in range(row + 1)]
        assert [r for r in range(row + 1) if positions[r] >= e] == list(range(int(wvis[i]), row + 1))

"""GATv2 encoder: the padded fast path equals PyG's GATv2Conv in outputs and gradients."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bench.data.graph import knn_edge_index
from methods.graph_layers import GATv2Encoder, _dropout, _Maximum, gatv2_padded, in_neighbour_table


def _graph(n: int, k: int = 4, symmetric: bool = False, seed: int = 0) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    coords = rng.permutation(np.stack(np.meshgrid(np.arange(12), np.arange(12)), -1).reshape(-1, 2))[:n]
    return torch.from_numpy(knn_edge_index(coords.astype(np.float32), k=k, symmetric=symmetric))


def _grads(module: torch.nn.Module, x: torch.Tensor, out: torch.Tensor) -> list[torch.Tensor]:
    weight = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    params = [x, *module.parameters()]
    return torch.autograd.grad((out * weight).sum(), params)


def test_neighbour_table_lists_sources_per_target_with_self_loop_first():
    edge_index = torch.tensor([[0, 0, 1, 2, 2], [1, 2, 2, 1, 2]])  # 2->2 is a self loop, dropped
    table = in_neighbour_table(edge_index, 4, block_slots=3)
    assert table.index.shape == (4, 3)
    assert table.order.tolist()[:2] == [1, 2]  # in-degree 3 first, then the self-loop-only nodes
    sources = {int(t): sorted(table.index[r][table.mask[r]].tolist()) for r, t in enumerate(table.order)}
    assert sources == {0: [0], 1: [0, 1, 2], 2: [0, 1, 2], 3: [3]}
    assert table.index[:, 0].tolist() == table.order.tolist()
    assert table.blocks == ((0, 1, 3), (1, 2, 3), (2, 4, 1))


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("train", [False, True])
def test_encoder_fast_path_equals_pyg(symmetric: bool, train: bool):
    torch.manual_seed(0)
    n, d = 40, 24
    edge_index = _graph(n, symmetric=symmetric)
    enc = GATv2Encoder(d, 16, heads=2, dropout=0.0, attn_dropout=0.0).double().train(train)
    x = torch.randn(n, d, dtype=torch.float64, requires_grad=True)
    enc.fast = True
    out_fast = enc(x, edge_index)
    grads_fast = _grads(enc, x, out_fast)
    enc.fast = False
    out_ref = enc(x, edge_index)
    grads_ref = _grads(enc, x, out_ref)
    assert out_fast.shape == (n, 16)
    torch.testing.assert_close(out_fast, out_ref, atol=1e-5, rtol=1e-5)
    for g_fast, g_ref in zip(grads_fast, grads_ref, strict=True):
        torch.testing.assert_close(g_fast, g_ref, atol=1e-5, rtol=1e-5)


def test_one_layer_fast_path_equals_pyg_in_float32():
    torch.manual_seed(0)
    n = 50
    enc = GATv2Encoder(32, 16, attn_dropout=0.0).eval()
    x = torch.randn(n, 32, requires_grad=True)
    edge_index = _graph(n, k=8)
    out_fast = gatv2_padded(enc.gat1, x, in_neighbour_table(edge_index, n))
    out_ref = enc.gat1(x, edge_index)
    torch.testing.assert_close(out_fast, out_ref, atol=1e-5, rtol=1e-5)
    for g_fast, g_ref in zip(_grads(enc.gat1, x, out_fast), _grads(enc.gat1, x, out_ref), strict=True):
        torch.testing.assert_close(g_fast, g_ref, atol=1e-5, rtol=1e-5)


def test_encoder_dropout_is_active_in_training_only():
    torch.manual_seed(0)
    enc = GATv2Encoder(16, 8)
    x, edge_index = torch.randn(30, 16), _graph(30)
    enc.train()
    assert not torch.equal(enc(x, edge_index), enc(x, edge_index))
    enc.eval()
    torch.testing.assert_close(enc(x, edge_index), enc(x, edge_index))


def test_encoder_rejects_heads_not_dividing_width():
    with pytest.raises(ValueError, match="divisible"):
        GATv2Encoder(16, 9, heads=2)


def test_fast_maximum_has_torch_maximum_gradients_including_ties():
    a = torch.tensor([1.0, 2.0, 3.0, -1.0], requires_grad=True)
    b = torch.tensor([0.0, 2.0, 4.0, -1.0], requires_grad=True)
    grad = torch.tensor([1.0, 2.0, 3.0, 4.0])
    out = _Maximum.apply(a, b)
    grads = torch.autograd.grad(out, (a, b), grad)
    a2, b2 = a.detach().requires_grad_(), b.detach().requires_grad_()
    ref = torch.maximum(a2, b2)
    torch.testing.assert_close(out, ref)
    for g, g_ref in zip(grads, torch.autograd.grad(ref, (a2, b2), grad), strict=True):
        torch.testing.assert_close(g, g_ref)


def test_fast_dropout_zeroes_a_fraction_p_and_keeps_the_mean():
    torch.manual_seed(0)
    x = torch.ones(200, 100)
    out = _dropout(x, 0.3, training=True)
    assert abs((out == 0).float().mean().item() - 0.3) < 0.02
    assert abs(out.mean().item() - 1.0) < 0.03
    assert _dropout(x, 0.3, training=False) is x


def test_encoder_builds_each_graph_table_once_and_forgets_freed_graphs(monkeypatch):
    import gc

    import methods.graph_layers as gl

    builds = []
    real = gl.in_neighbour_table
    monkeypatch.setattr(gl, "in_neighbour_table", lambda *a, **k: builds.append(1) or real(*a, **k))
    torch.manual_seed(0)
    enc = GATv2Encoder(16, 8).eval()
    x, edge_index = torch.randn(30, 16), _graph(30)
    first = enc(x, edge_index)
    torch.testing.assert_close(enc(x, edge_index), first, rtol=0, atol=0)
    assert len(builds) == 1 and len(enc._tables) == 1
    torch.testing.assert_close(enc(x, edge_index.clone()), first, rtol=0, atol=0)  # a new tensor: built anew
    gc.collect()
    assert len(builds) == 2 and len(enc._tables) == 1  # the clone's table went with it
    del edge_index
    gc.collect()
    assert enc._tables == {}


def test_neighbour_table_blocks_pad_each_run_of_degrees_to_its_own_width():
    edge_index = _graph(120, k=8)
    table = in_neighbour_table(edge_index, 120, block_slots=256)
    degree = table.mask.sum(1)
    assert table.blocks[0][0] == 0 and table.blocks[-1][1] == 120
    for (first, end, w), (nxt, _, _) in zip(table.blocks, (*table.blocks[1:], (120, 0, 0)), strict=True):
        assert end == nxt and w == int(degree[first]) and (end - first) * w <= 256  # contiguous, bounded
    padded = sum((end - first) * w for first, end, w in table.blocks)
    assert padded < 1.2 * int(degree.sum()) < 120 * table.index.shape[1]  # near the real slots


def test_encoder_trains_after_inference_with_its_kept_work_buffers():
    torch.manual_seed(0)
    enc = GATv2Encoder(16, 8, attn_dropout=0.0, dropout=0.0)
    x, edge_index = torch.randn(30, 16, requires_grad=True), _graph(30)
    with torch.inference_mode():  # the workspace's buffers are first allocated here
        before = enc(x, edge_index)
    out = enc(x, edge_index)
    grads = _grads(enc, x, out)
    fresh = GATv2Encoder(16, 8, attn_dropout=0.0, dropout=0.0)
    fresh.load_state_dict(enc.state_dict())
    torch.testing.assert_close(out, before, rtol=0, atol=0)
    for g, g_fresh in zip(grads, _grads(fresh, x, fresh(x, edge_index)), strict=True):
        torch.testing.assert_close(g, g_fresh, rtol=0, atol=0)

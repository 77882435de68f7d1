"""The method interface the harness reads instead of method internals: ``explain_maps``, ``cfg.needs()`` and
each class's provenance (``paper``, ``code_url``, ...), with the rows and table generated from it."""

from __future__ import annotations

import dataclasses
import re

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from methods import (
    Bag,
    DataNeeds,
    MILMethod,
    PatchMap,
    create_method,
    get_method_class,
    list_methods,
    resolve_config,
)
from methods.registry import method_rows, methods_markdown, register_method

D, G = 16, 12
MOMKD_SIZES = {"wsi_dim": 8, "omics_embed_dim": 8, "omics_hidden_dim": 16, "shared_dim": 4, "memory_size": 3}


def _maps(model: MILMethod, bag: Bag) -> tuple[dict[str, PatchMap], Tensor]:
    model.eval()
    with torch.inference_mode():
        out = model(bag)
        return model.explain_maps(bag, out), out.extras.get("z")


# ---------------------------------------------------------------- explain_maps


@pytest.mark.parametrize("name", list_methods())
def test_explain_maps_are_per_patch_and_well_formed(name, bag_maker):
    torch.manual_seed(0)
    cfg = resolve_config(name)
    model = create_method(name, in_dim=D, omics_dim=G if cfg.uses_omics else None)
    bag = bag_maker([15], D, G)[0]
    maps, _ = _maps(model, bag)
    overrides = type(model).explain_maps is not MILMethod.explain_maps
    assert bool(maps) == overrides  # the default offers nothing beyond the attention
    for title, patch_map in maps.items():
        assert isinstance(patch_map, PatchMap) and title
        assert patch_map.values.shape == (15,) and patch_map.values.dtype.is_floating_point, title
        if patch_map.categories is not None:
            index = patch_map.values
            assert torch.equal(index, index.round()), title
            assert int(index.min()) >= 0 and int(index.max()) < len(patch_map.categories), title
            if patch_map.classes is not None:
                assert len(patch_map.classes) == len(patch_map.categories), title


def test_default_explain_maps_is_empty(bag_maker):
    model = create_method("abmil", in_dim=D)
    bag = bag_maker([9], D, G)[0]
    assert model.explain_maps(bag, model(bag)) == {}


def _nearest_codes(model, z: Tensor, active: Tensor | None = None) -> Tensor:
    """Independent of the method's ``sim``: cosine of each unit patch embedding to each normalised code of
    both banks, pruned codes excluded, argmax over the 2K flattened codes (bank 0 = C−, bank 1 = C+)."""
    codes = F.normalize(model.memory.detach(), dim=-1)  # (2, K, S)
    cos = torch.einsum("ns,bks->nbk", z, codes)
    if active is not None:
        cos = cos.masked_fill(~active, -torch.inf)
    return cos.reshape(len(z), -1).argmax(dim=1)


def test_momkd_maps_are_the_nearest_bank_and_component():
    torch.manual_seed(0)
    model = create_method("momkd", D, G, **MOMKD_SIZES)
    bag = Bag(
        features=torch.randn(30, D),
        label=torch.tensor(1),
        edge_index=torch.stack([torch.arange(30), (torch.arange(30) + 1) % 30]),
    )
    maps, z = _maps(model, bag)
    k = MOMKD_SIZES["memory_size"]
    assert list(maps) == ["nearest class memory bank", "nearest memory component"]
    bank, component = maps["nearest class memory bank"], maps["nearest memory component"]
    flat = _nearest_codes(model, z)
    assert torch.equal(bank.values, (flat // k).float())
    assert torch.equal(component.values, flat.float())
    assert bank.categories == ("C− (negative)", "C+ (positive)") and bank.classes == (0, 1)
    assert component.categories == ("C−0", "C−1", "C−2", "C+0", "C+1", "C+2")
    assert len(component.categories) == 2 * k and component.classes == (0, 0, 0, 1, 1, 1)
    assert len(set(flat.tolist())) > 1  # the check is not satisfied by one code for every patch


def test_momkd_maps_never_name_a_pruned_component():
    torch.manual_seed(0)
    model = create_method("momkd[adaptive-memory]", D, G, **MOMKD_SIZES)
    bag = Bag(
        features=torch.randn(40, D),
        label=torch.tensor(0),
        edge_index=torch.stack([torch.arange(40), (torch.arange(40) + 1) % 40]),
    )
    before, z = _maps(model, bag)
    used = before["nearest memory component"].values.long()
    top = int(used.mode().values)  # the most chosen code: prune it
    with torch.no_grad():
        model.active.view(-1)[top] = False
    after, z = _maps(model, bag)
    chosen = after["nearest memory component"].values.long()
    assert top not in chosen.tolist()
    assert torch.equal(chosen, _nearest_codes(model, z, model.active))


# ---------------------------------------------------------------- declared data needs


@pytest.mark.parametrize("name", list_methods())
def test_needs_declare_graph_omics_and_gene_groups(name):
    cfg = resolve_config(name)
    needs = cfg.needs()
    assert isinstance(needs, DataNeeds)
    privileged = name == "ceiling-privileged"  # reads the true programs, not the omics
    assert needs == DataNeeds(
        graph=name == "momkd",
        omics=name not in ("abmil", "wikg") and not privileged,
        gene_groups=name == "ghanet",
        privileged=privileged,
    )
    assert needs.graph == cfg.needs_graph and needs.omics == cfg.uses_omics
    assert needs.gene_groups == ("gene_groups" in {f.name for f in dataclasses.fields(cfg)})
    assert "needs" not in dataclasses.asdict(cfg)  # a method, not a field: config hashes are unchanged


def test_needs_follow_the_variant():
    assert resolve_config("momkd[wsi-baseline]").needs() == DataNeeds(
        graph=True, omics=False, gene_groups=False
    )
    filled = resolve_config("ghanet").replace(gene_groups=(0, 1, 2))
    assert filled.needs().gene_groups and filled.gene_groups == (0, 1, 2)


# ---------------------------------------------------------------- provenance


@pytest.mark.parametrize("name", list_methods())
def test_every_method_says_where_it_comes_from(name):
    cls = get_method_class(name)
    assert re.search(r"\b(19|20)\d\d\b", cls.paper), "the citation names the year"
    assert cls.paper_url.startswith("https://")
    assert re.fullmatch(r"https://github\.com/[\w.-]+/[\w.-]+", cls.code_url)
    assert re.fullmatch(r"[0-9a-f]{40}", cls.code_commit)


@pytest.mark.parametrize("missing", ["paper", "code_url"])
def test_registering_a_method_without_provenance_is_refused(missing):
    attrs = {"paper": "Someone et al., Venue 2030", "code_url": "https://github.com/someone/x"}
    attrs[missing] = ""
    with pytest.raises(ValueError, match=rf"unregistered-{missing}.*{missing}"):
        register_method(f"unregistered-{missing}")(type("Anonymous", (MILMethod,), attrs))
    assert f"unregistered-{missing}" not in list_methods()


def test_method_rows_and_markdown_come_from_the_classes():
    rows = method_rows()
    assert [row["name"] for row in rows] == list_methods()
    momkd = next(row for row in rows if row["name"] == "momkd")
    assert momkd["code"] == "https://github.com/CAIR-LAB-WFUSM/MoMKD@226ad63"
    assert momkd["paper"] == "Guo et al., CVPR 2026" and "fixed-memory" in momkd["variants"].split(", ")
    table = methods_markdown().splitlines()
    assert len(table) == 2 + len(rows)
    assert all(line.startswith("| `") and line.count(" | ") == 4 for line in table[2:])
    assert "[Guo et al., CVPR 2026](https://arxiv.org/abs/2602.21395)" in table[2 + rows.index(momkd)]

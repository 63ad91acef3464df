"""The offline pretrained backbone loads exactly, and bad weights files are refused with one line."""

from __future__ import annotations

import sys

import pytest
import torch

from saal.errors import SaalError
from saal.extras import MissingExtra, import_extra
from saal.models.pretrained import (
    FEATURE_DIM,
    default_weights_path,
    efficientnet_lite0,
    efficientnet_lite0_features,
    normalize,
    weights_fingerprint,
)


@pytest.fixture(scope="module")
def lite0() -> torch.nn.Module:
    return efficientnet_lite0()


def test_packaged_weights_load_strictly_and_classify(lite0: torch.nn.Module) -> None:
    original = torch.load(default_weights_path(), map_location="cpu", weights_only=True)
    loaded = lite0.state_dict()
    assert len(loaded) == len(original) == 296
    assert all(torch.equal(a, b) for a, b in zip(loaded.values(), original.values(), strict=True))
    x = normalize(torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0)))
    with torch.no_grad():
        logits = lite0(x)
        pooled = lite0.forward_head(lite0.forward_features(x), pre_logits=True)
    assert logits.shape == (2, 1000) and pooled.shape == (2, FEATURE_DIM)
    assert torch.isfinite(logits).all()


def test_timm_named_weights_file_loads_too(lite0: torch.nn.Module, tmp_path) -> None:
    path = tmp_path / "timm.pth"
    torch.save(lite0.state_dict(), path)
    again = efficientnet_lite0(path)
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), lite0.state_dict().values(), strict=True))
    assert weights_fingerprint(path) == weights_fingerprint(path)


def test_feature_pyramid_matches_the_full_network(lite0: torch.nn.Module) -> None:
    features = efficientnet_lite0_features(out_indices=(2, 3, 4))
    x = torch.rand(1, 3, 96, 128, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        maps = features(x)
        stem = lite0.bn1(lite0.conv_stem(x))
        stages = []
        h = stem
        for block in lite0.blocks:
            h = block(h)
            stages.append(h)
    assert features.feature_info.channels() == [40, 112, 320]
    assert [m.shape[1] for m in maps] == [40, 112, 320]
    assert torch.equal(maps[-1], stages[-1])


@pytest.mark.parametrize("content", [b"not a torch file", None])
def test_bad_weights_file_is_one_line(tmp_path, content: bytes | None) -> None:
    path = tmp_path / "bad.pth"
    if content is None:
        torch.save({"weight": torch.zeros(3)}, path)
    else:
        path.write_bytes(content)
    with pytest.raises(SaalError) as error:
        efficientnet_lite0(path)
    assert "\n" not in str(error.value) and str(path) in str(error.value)
    with pytest.raises(SaalError, match="does not exist"):
        efficientnet_lite0(tmp_path / "missing.pth")


def test_missing_extra_names_the_install_command(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "timm", None)
    with pytest.raises(MissingExtra, match=r"pip install 'saal\[pretrained\]'"):
        import_extra("timm", "pretrained", "the pretrained backbone")
    with pytest.raises(MissingExtra):
        efficientnet_lite0()

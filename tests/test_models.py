import pytest
import torch
from torch import nn

from saal.errors import SaalError
from saal.models import build_model, last_linear, logits_and_embedding


@pytest.mark.parametrize(
    ("name", "shape"),
    [("mlp", (1, 8, 8)), ("mlp", (64,)), ("cnn", (1, 28, 28)), ("cnn", (3, 32, 32)), ("cnn", (1, 8, 8))],
)
def test_models_give_logits_and_embeddings(name: str, shape: tuple[int, ...]) -> None:
    model = build_model(name, shape, 10).eval()
    x = torch.randn(3, *shape)
    logits, h = logits_and_embedding(model, x)
    assert logits.shape == (3, 10)
    assert torch.allclose(logits, model(x))
    assert torch.allclose(last_linear(model)(h), logits)


def test_cnn_has_dropout_for_mc_dropout() -> None:
    assert any(isinstance(m, nn.Dropout) for m in build_model("cnn", (1, 28, 28), 10).modules())


@pytest.mark.parametrize("channels", [1, 3])
def test_resnet18_is_cifar_style(channels: int) -> None:
    model = build_model("resnet18", (channels, 32, 32), 10).eval()
    assert model.backbone.conv1.kernel_size == (3, 3) and model.backbone.conv1.stride == (1, 1)
    assert isinstance(model.backbone.maxpool, nn.Identity)
    assert model(torch.randn(2, channels, 32, 32)).shape == (2, 10)


def test_user_module_is_used_as_is_and_embeds_through_hook() -> None:
    user = nn.Sequential(nn.Flatten(), nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3))
    assert build_model(user, (4,), 3) is user
    logits, h = logits_and_embedding(user, torch.randn(5, 4))
    assert h.shape == (5, 6) and logits.shape == (5, 3)


def test_bad_model_requests() -> None:
    with pytest.raises(SaalError, match="unknown model"):
        build_model("vgg", (1, 8, 8), 10)
    with pytest.raises(SaalError, match="image inputs"):
        build_model("cnn", (64,), 10)
    with pytest.raises(SaalError, match=r"no nn\.Linear"):
        last_linear(nn.Sequential(nn.Conv2d(1, 1, 3)))

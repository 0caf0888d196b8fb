"""Published weights through the zoos' own loaders and caches, offline.

Every test runs without a network: Hugging Face's hub is offline (``HF_HUB_OFFLINE``) with its
cache under tmp_path, ``TORCH_HOME`` is under tmp_path, and torch.hub's download raises URLError.
A filled cache is a random network's weights saved where timm / torchvision look for the
published file, so a model built from it must hold exactly those weights; an empty cache must
give the error that names the path and the file to put there.
"""

import types
import urllib.error

import pytest
import safetensors.torch
import timm
import torch
import torchvision

from fastdfd.cli import build_parser
from fastdfd.cli.commands import _loaded
from fastdfd.models import create_model
from fastdfd.recipes import load_recipe
from fastdfd.recipes.preflight import preflight

COMMIT = "0123456789abcdef0123456789abcdef01234567"
TV_WEIGHTS = torchvision.models.ResNet18_Weights.IMAGENET1K_V1
TV_FILE = TV_WEIGHTS.url.rpartition("/")[2]  # resnet18-f37072fd.pth


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """No network, empty caches under tmp_path: .hf (the HF hub cache), .checkpoints (torch.hub's)."""
    from huggingface_hub import constants

    hf, torch_home = tmp_path / "hf" / "hub", tmp_path / "torch"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(hf))
    monkeypatch.setenv("TORCH_HOME", str(torch_home))  # torch.hub.get_dir() reads it on each call
    # huggingface_hub reads its environment once, at import
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hf))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)

    def no_network(url, dst, *args, **kwargs):
        raise urllib.error.URLError(f"no network in the tests ({url})")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    assert torch.hub.get_dir() == str(torch_home / "hub")
    return types.SimpleNamespace(hf=hf, checkpoints=torch_home / "hub" / "checkpoints")


def _hf_cache(hf, repo: str, state: dict) -> None:
    """The layout huggingface_hub writes: refs/main names the commit, snapshots/<commit>/ holds the file."""
    folder = hf / f"models--{repo.replace('/', '--')}"
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text(COMMIT)
    (folder / "snapshots" / COMMIT).mkdir(parents=True)
    safetensors.torch.save_file(state, str(folder / "snapshots" / COMMIT / "model.safetensors"))


def _same(model, state: dict, skip=()) -> None:
    own = model.state_dict()
    for k, v in state.items():
        if not k.startswith(skip):
            assert torch.equal(own[k], v), k


def _random_timm_resnet18() -> dict:
    torch.manual_seed(1)
    return {k: v.contiguous() for k, v in timm.create_model("resnet18").state_dict().items()}


def test_torchvision_weights_enum_from_torch_hubs_cache(offline):
    torch.manual_seed(1)
    state = torchvision.models.resnet18().state_dict()
    offline.checkpoints.mkdir(parents=True)
    torch.save(state, offline.checkpoints / TV_FILE)
    for model in (create_model("torchvision:resnet18:IMAGENET1K_V1", num_classes=1000, in_channels=3),
                  create_model("torchvision:resnet18", weights="IMAGENET1K_V1"),
                  create_model("torchvision:resnet18", weights=TV_WEIGHTS)):
        _same(model, state)
    with pytest.raises(ValueError, match=r"unknown weights 'IMAGENET1K_V3' for torchvision's resnet18; "
                                         r"ResNet18_Weights has IMAGENET1K_V1, DEFAULT"):
        create_model("torchvision:resnet18:IMAGENET1K_V3")
    with pytest.raises(ValueError, match=r"ResNet18_Weights.IMAGENET1K_V1 have a 1000-class head, but num_classes=10"):
        create_model("torchvision:resnet18:IMAGENET1K_V1", num_classes=10)


def test_torchvision_empty_cache_names_the_file(offline):
    with pytest.raises(FileNotFoundError) as info:
        create_model("torchvision:resnet18:DEFAULT")
    message = str(info.value)
    assert f"put {TV_WEIGHTS.url} at {offline.checkpoints / TV_FILE}" in message, message
    assert "URLError" in message and "ResNet18_Weights.IMAGENET1K_V1" in message, message
    assert not (offline.checkpoints / TV_FILE).exists()


def test_timm_pretrained_from_the_hf_cache(offline):
    state = _random_timm_resnet18()
    _hf_cache(offline.hf, "timm/resnet18.a1_in1k", state)
    _same(create_model("timm:resnet18", pretrained=True), state)
    _same(create_model("timm:resnet18.a1_in1k", pretrained=True), state)
    # timm's own adaptation: another class count drops the head, one channel sums the stem
    model = create_model("timm:resnet18", num_classes=10, in_channels=1, pretrained=True)
    _same(model, state, skip=("fc.", "conv1."))
    assert model.fc.weight.shape == (10, 512)
    torch.testing.assert_close(model.conv1.weight, state["conv1.weight"].sum(1, keepdim=True))


def test_timm_url_weights_from_torch_hubs_cache(offline):
    """A configuration with a url and no hub repository: timm reads torch.hub's cache."""
    state = _random_timm_resnet18()
    url = timm.models.get_pretrained_cfg("resnet18").url
    offline.checkpoints.mkdir(parents=True)
    torch.save(state, offline.checkpoints / url.rpartition("/")[2])
    _same(create_model("timm:resnet18", pretrained=True, pretrained_cfg_overlay={"hf_hub_id": None}), state)


def test_timm_pretrained_file(offline, tmp_path):
    state = _random_timm_resnet18()
    file = tmp_path / "model.safetensors"
    safetensors.torch.save_file(state, str(file))
    _same(create_model("timm:resnet18", pretrained=True, pretrained_file=str(file)), state)
    _same(create_model("timm:resnet18", pretrained_file=file, num_classes=7), state, skip=("fc.",))


def test_timm_empty_cache_names_the_cache_and_the_file_option(offline):
    with pytest.raises(FileNotFoundError) as info:
        create_model("timm:resnet18", pretrained=True)
    message = str(info.value)
    assert f"the Hugging Face cache {offline.hf / 'models--timm--resnet18.a1_in1k'} " in message, message
    assert "snapshots/<commit>/model.safetensors" in message and "hf download timm/resnet18.a1_in1k" in message
    assert "pretrained_file=FILE (--pretrained-file FILE; timm's pretrained_cfg_overlay=dict(file=FILE))" in message
    assert "LocalEntryNotFoundError" in message, message
    url = timm.models.get_pretrained_cfg("resnet18").url
    with pytest.raises(FileNotFoundError) as info:
        create_model("timm:resnet18", pretrained=True, pretrained_cfg_overlay={"hf_hub_id": None})
    message = str(info.value)
    assert f"torch.hub's cache: {offline.checkpoints / url.rpartition('/')[2]} (from {url})" in message, message
    assert "URLError" in message and "pretrained_file=FILE" in message, message


def test_recipe_and_cli_take_published_weights(offline):
    state = _random_timm_resnet18()
    _hf_cache(offline.hf, "timm/resnet18.a1_in1k", state)
    # digits: 1 channel, 10 classes; timm adapts the stem and drops the head
    prep = preflight(load_recipe("digits", ["teacher.model='timm:resnet18'", "teacher.pretrained=true"]))
    assert prep.teacher_trained and prep.train_set is None
    _same(prep.teacher, state, skip=("fc.", "conv1."))

    torch.manual_seed(1)
    tv_state = torchvision.models.resnet18().state_dict()
    offline.checkpoints.mkdir(parents=True)
    torch.save(tv_state, offline.checkpoints / TV_FILE)
    args = build_parser().parse_args(["train-generators", "--teacher", "torchvision:resnet18", "--weights-enum",
                                      "IMAGENET1K_V1", "--num-classes", "1000", "--out", "unused"])
    _same(_loaded(args, args.teacher, args.num_classes, args.channels, args.weights, "--weights", "teacher"), tv_state)
    args = build_parser().parse_args(["distill", "--teacher", "timm:resnet18", "--pretrained", "--student",
                                      "resnet18", "--generators", "g.pt", "--out", "unused"])
    assert args.pretrained and args.teacher_weights is None
    _same(_loaded(args, args.teacher, 1000, 3, args.teacher_weights, "--teacher-weights", "teacher"), state)

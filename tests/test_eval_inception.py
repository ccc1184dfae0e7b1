"""The FID InceptionV3 loads local weights offline (no torchvision, no download) and gives 2048-d features."""

import pytest
import torch

from ldm_users.errors import ConfigError
from ldm_users.evaluation.inception import FEATURE_DIM, FIDInceptionV3, load_inception

# torchvision's Inception3(num_classes=1008, aux_logits=False), the network of pytorch-fid's
# pt_inception-2015-12-05 weights: 23,834,568 parameters with 1000 classes, plus 8 x (2048 + 1).
FID_INCEPTION_PARAMETERS = 23_850_960


@pytest.fixture(scope="module")
def random_weights(tmp_path_factory):
    """A randomly initialised network of the right shape, saved like the real weights file (fp16 to stay small)."""
    torch.manual_seed(0)
    model = FIDInceptionV3()
    # Non-trivial batch-norm statistics, so a load that silently kept the defaults would be caught.
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.1, 0.1)
            module.running_var.uniform_(0.5, 1.5)
    path = tmp_path_factory.mktemp("inception") / "pt_inception-random.pth"
    torch.save({k: v.half() if v.is_floating_point() else v for k, v in model.state_dict().items()}, path)
    return path, model


def test_architecture_matches_the_fid_network():
    model = FIDInceptionV3()
    assert sum(p.numel() for p in model.parameters()) == FID_INCEPTION_PARAMETERS
    keys = set(model.state_dict())
    for key in ("Conv2d_1a_3x3.conv.weight", "Conv2d_1a_3x3.bn.running_var", "Mixed_5b.branch5x5_2.conv.weight",
                "Mixed_6e.branch7x7dbl_5.bn.bias", "Mixed_7c.branch3x3dbl_3b.conv.weight", "fc.weight"):
        assert key in keys
    assert model.fc.weight.shape == (1008, FEATURE_DIM)


def test_local_weights_load_offline_and_give_features(random_weights):
    path, reference = random_weights
    model = load_inception(path)
    loaded = model.state_dict()
    assert torch.equal(loaded["Mixed_7c.branch_pool.bn.running_var"],
                       reference.state_dict()["Mixed_7c.branch_pool.bn.running_var"].half().float())
    images = torch.stack([torch.full((3, 32, 32), -1.0), torch.rand(3, 32, 32) * 2 - 1])  # any size: resized to 299
    with torch.no_grad():
        feats = model(images)
        again = model(images)
    assert feats.shape == (2, FEATURE_DIM)
    assert torch.isfinite(feats).all() and torch.equal(feats, again)
    assert not torch.equal(feats[0], feats[1])  # the features depend on the image (a random net barely does)


def test_safetensors_weights_and_an_imagenet_head_are_accepted(random_weights, tmp_path):
    from safetensors.torch import save_file

    _, reference = random_weights
    state = {k: v.contiguous() for k, v in reference.state_dict().items()}
    state["fc.weight"], state["fc.bias"] = torch.zeros(1000, FEATURE_DIM), torch.zeros(1000)  # torchvision's head
    file = tmp_path / "inception.safetensors"
    save_file(state, str(file))
    model = load_inception(file)
    assert torch.equal(model.state_dict()["Conv2d_1a_3x3.conv.weight"], state["Conv2d_1a_3x3.conv.weight"])


def test_bad_weights_are_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_inception(tmp_path / "missing.pth")
    wrong = tmp_path / "wrong.pth"
    torch.save({"conv.weight": torch.zeros(3)}, wrong)
    with pytest.raises(ConfigError, match="not an InceptionV3 state dict"):
        load_inception(wrong)
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(ConfigError, match="could not be read"):
        load_inception(garbage)

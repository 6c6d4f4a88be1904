"""The split is model-agnostic (paper Sec. 3): any models.SplitNet a user builds is split, masked and
trained through the library, and the small ViT trains through train_vision.py."""
from pathlib import Path

import pytest
import torch
import torch.nn as nn

import models
import neurotrails

DEBIAN = Path("/usr/share/datasets/fashion-mnist")


def tiny_mlp(num_classes=4):
    """What a user writes: a stem, blocks and a tail, each mapping one tensor to one tensor."""
    return models.SplitNet(nn.Linear(8, 16), [nn.Sequential(nn.Linear(16, 16), nn.ReLU()) for _ in range(3)],
                           nn.Linear(16, num_classes))


def train_steps(net, masks, x, y, steps=6):
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    for step in range(1, steps + 1):
        loss = neurotrails.ensemble_loss(net(x), y)
        opt.zero_grad()
        loss.backward()
        if masks.is_update_step(step):
            masks.update(step, opt)
        opt.step()
        masks.apply_(opt)
    return loss


def assert_masks_hold(net, masks):
    weights = neurotrails.masked_weights(net)
    for name, mask in masks.masks.items():
        assert int(torch.count_nonzero(weights[name][~mask])) == 0, name


def test_a_user_built_splitnet_is_split_masked_and_trained():
    torch.manual_seed(0)
    net = neurotrails.build(tiny_mlp, num_heads=3, blocks_in_head=2)
    assert len(net.backbone) == 2 and net.num_heads == 3  # stem + block0; each head: block1, block2, tail
    assert [n for n, _ in net.heads[0].named_children()] == ["block1", "block2", "tail"]
    masks = neurotrails.build_masks(net, 0.5, delta_t=2, t_end=6)
    x, y = torch.randn(32, 8), torch.randint(0, 4, (32,))
    first = neurotrails.ensemble_loss(net(x), y).item()
    before = {n: m.clone() for n, m in masks.masks.items()}
    last = train_steps(net, masks, x, y)
    assert last.item() < first and net(x).shape == (3, 32, 4)
    assert any(not torch.equal(before[n], m) for n, m in masks.masks.items())  # the topology evolved
    assert all(int(m.sum()) == int(before[n].sum()) for n, m in masks.masks.items())  # counts kept
    assert_masks_hold(net, masks)


def test_vit_heads_differ_and_their_masks_hold_after_steps():
    torch.manual_seed(0)
    net = neurotrails.build("vit-3-32", num_heads=3, num_classes=10, in_channels=1)
    assert net.blocks_in_head == 2 and len(net.backbone) == 2  # patch embedding + first encoder block
    masks = neurotrails.build_masks(net, 0.8, delta_t=2, t_end=6)
    assert any(n.endswith("qkv.weight") for n in masks.masks)  # attention projections are sparse too
    x, y = torch.randn(16, 1, 28, 28), torch.randint(0, 10, (16,))
    train_steps(net, masks, x, y)
    logits = net(x)
    assert logits.shape == (3, 16, 10)
    assert not torch.allclose(logits[0], logits[1]) and not torch.allclose(logits[1], logits[2])
    assert_masks_hold(net, masks)


@pytest.mark.skipif(not DEBIAN.is_dir(), reason="needs the Debian package dataset-fashion-mnist")
def test_vit_trains_through_train_vision(tmp_path):
    import json
    import train_vision
    train_vision.main(["--dataset", "fashion-mnist", "--data-dir", str(tmp_path / "data"), "--model", "vit-2-32",
                       "--train-subset", "128", "--test-subset", "64", "--batch-size", "32", "--epochs", "1",
                       "--budget", "equal", "--delta-t", "2", "--out", str(tmp_path / "run")])
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["config"]["model"] == "vit-2-32" and 0 < results["metrics"]["infer_flops_vs_single"] < 3
